"""Caches stay up when the only problem is our own busy process (issue 19): an event loop blocked
for longer than the Redis timeout must not fail calls whose replies had arrived, open the circuit
breaker, or drop the invalidation channel (and with it L1). A Redis that really is gone or silent
keeps today's behaviour: calls time out after REDIS_SOCKET_TIMEOUT_MS of loop time and count toward
the breaker, and a lost channel clears and bypasses L1.

The loop is blocked on purpose with `time.sleep` inside the test's own coroutine: nothing else can
run meanwhile, exactly as under a CPU-bound burst."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from companion.cache import keys
from companion.cache.backend import CacheUnavailable
from companion.cache.breaker import CircuitBreaker
from companion.cache.invalidation import InvalidationListener
from companion.cache.local import MISSING, LocalCache
from companion.cache.redis import RedisBackend, make_client
from companion.cache.tiered import TieredCache
from companion.overload.loop import LoopMonitor
from tests.cache.helpers import HoldingProxy, Item, ItemCodec, Loader
from tests.support.live import wait_for
from tests.support.redis_server import RedisServer
from tests.support.redis_topologies import CONTRACT_TIMEOUT_MS, contract_client
from tests.support.tcp_proxy import TcpProxy

TIMEOUT = 0.25  # REDIS_SOCKET_TIMEOUT_MS's default
BLOCK = 0.6  # how long the test blocks the loop: well past TIMEOUT
USER = uuid.UUID("00000000-0000-4000-8000-0000000000cc")
KEY = keys.personality(USER, "friendly")
CODEC = ItemCodec()


@dataclass
class Worker:
    """One instance's Redis side, as Services builds it: monitor, backend, tiered cache, listener."""

    monitor: LoopMonitor
    backend: RedisBackend
    cache: TieredCache
    listener: InvalidationListener


async def _worker(url: str, name: str) -> Worker:
    monitor = LoopMonitor()
    monitor.start()
    client = make_client(url, socket_timeout_ms=int(TIMEOUT * 1000), health_check_interval=1)
    backend = RedisBackend(
        client, breaker=CircuitBreaker(failure_threshold=1, reset_seconds=3600), loop=monitor, timeout=TIMEOUT
    )
    cache = TieredCache(backend, local=LocalCache(), instance_id=name)
    listener = InvalidationListener(client, cache, retry_seconds=0.02, max_retry_seconds=0.1)
    listener.start()
    await wait_for(listener.connected.is_set, what="the listener to subscribe")
    return Worker(monitor, backend, cache, listener)


async def _close(worker: Worker) -> None:
    async with asyncio.timeout(10):
        await worker.listener.aclose()
    await worker.backend.aclose()
    worker.monitor.stop()


@pytest.fixture
async def worker(redis_url: str) -> AsyncIterator[Worker]:
    made = await _worker(redis_url, "mine")
    yield made
    await _close(made)


def block_loop(seconds: float = BLOCK) -> None:
    time.sleep(seconds)  # deliberately blocking: the event loop runs nothing meanwhile


async def test_calls_in_flight_while_the_loop_is_blocked_succeed_and_the_breaker_stays_closed(
    worker: Worker,
) -> None:
    await worker.backend.set(KEY, b"v")
    calls = [asyncio.create_task(worker.backend.get(KEY)) for _ in range(20)]
    await asyncio.sleep(0)  # every command is sent; the replies come while the loop is blocked
    block_loop()
    assert await asyncio.gather(*calls) == [b"v"] * 20
    assert worker.backend.breaker.state == "closed" and worker.backend.breaker.outages == 0
    assert worker.monitor.stalled >= BLOCK * 0.9


async def test_repeated_stalls_do_not_drop_the_invalidation_channel_or_l1(worker: Worker, redis_url: str) -> None:
    # Another instance (not the one whose loop stalls): only its invalidation matters, not how fast.
    other = contract_client(redis_url)
    theirs = TieredCache(
        RedisBackend(other, timeout=CONTRACT_TIMEOUT_MS / 1000), local=LocalCache(), instance_id="theirs"
    )
    try:
        loader = Loader(Item(name="friendly", version=1))
        for round_ in range(4):  # long enough for the pub/sub health check (1 s) to come due
            await worker.cache.get_or_load(KEY, loader, CODEC, ttl=60, local_ttl=30, miss_ttl=10)
            assert worker.cache.local.get(KEY) is not MISSING
            block_loop()
            await asyncio.sleep(0.05)  # the loop turns again: whatever is pending runs
            assert worker.listener.connected.is_set(), f"channel dropped after stall {round_}"
            assert worker.cache.local.enabled
            assert worker.cache.local.get(KEY) is not MISSING  # L1 was not cleared
        await theirs.invalidate(KEY)  # and the channel still works
        await wait_for(lambda: worker.cache.local.get(KEY) is MISSING, timeout=10, what="the invalidation")
        assert worker.backend.breaker.outages == 0
    finally:
        await other.aclose()


async def test_a_cut_channel_still_clears_and_bypasses_l1(redis_server: RedisServer, redis_url: str) -> None:
    proxy = TcpProxy(redis_server.port)
    await proxy.start()
    made = await _worker(f"redis://127.0.0.1:{proxy.port}/0", "mine")
    try:
        await made.cache.get_or_load(KEY, Loader(Item(name="friendly", version=1)), CODEC, ttl=60, local_ttl=30)
        assert made.cache.local.get(KEY) is not MISSING
        await proxy.stop()  # the connection is really gone
        await wait_for(lambda: not made.listener.connected.is_set(), what="the channel to be reported lost")
        assert not made.cache.local.enabled and made.cache.local.get(KEY) is MISSING
        await proxy.start()
        await wait_for(made.listener.connected.is_set, what="the listener to come back")
    finally:
        await proxy.stop()
        await _close(made)


async def test_a_killed_redis_still_drops_the_channel(redis_server: RedisServer, worker: Worker) -> None:
    redis_server.stop()
    await wait_for(lambda: not worker.listener.connected.is_set(), what="the channel to be reported lost")
    assert not worker.cache.local.enabled
    redis_server.start()
    await wait_for(worker.listener.connected.is_set, what="the listener to come back")


async def test_a_redis_that_does_not_answer_times_out_on_a_responsive_loop_and_opens_the_breaker(
    redis_server: RedisServer, redis_url: str
) -> None:
    proxy = HoldingProxy(redis_server.port, hold=b"GET")  # GETs reach Redis only after release()
    await proxy.start()
    monitor = LoopMonitor()
    monitor.start()
    backend = RedisBackend(
        make_client(proxy.url, socket_timeout_ms=int(TIMEOUT * 1000)),
        breaker=CircuitBreaker(failure_threshold=1, reset_seconds=3600),
        loop=monitor,
        timeout=TIMEOUT,
    )
    try:
        await backend.set(KEY, b"v")
        with pytest.raises(CacheUnavailable):
            await backend.get(KEY)
        assert backend.breaker.state == "open" and backend.late == 0
    finally:
        proxy.release()
        await backend.aclose()
        await proxy.aclose()
        monitor.stop()
