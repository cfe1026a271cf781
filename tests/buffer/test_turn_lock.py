"""One turn at a time per conversation, on one instance (in-process lock) and across instances
(Redis lease), with the same behaviour: waiters queue, a wait that runs out is a 409, nothing hangs."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from companion.cache import keys
from companion.cache.redis import RedisBackend
from companion.conversations.turns import LocalTurnLock, RedisTurnLock, TurnLock
from companion.errors import Conflict
from tests.support.live import wait_for
from tests.support.redis_server import RedisServer
from tests.support.redis_topologies import backend_on, contract_backend


@pytest.fixture
async def backends(buffer_redis: RedisServer) -> AsyncIterator[tuple[RedisBackend, RedisBackend]]:
    """Two clients on one Redis, as two service instances would have."""
    buffer_redis.start()
    # Generous operation timeouts, as the topology fixtures have: on a loaded machine a 250 ms one
    # can run out, and a lock whose Redis call fails falls back to its instance's own lock, which
    # the other instance cannot see (right in an outage; here it would only be the test's load).
    first = contract_backend(buffer_redis.url)
    second = contract_backend(buffer_redis.url)
    yield first, second
    await first.aclose()
    await second.aclose()
    buffer_redis.start()


async def _two_on(kind: str, request: pytest.FixtureRequest) -> AsyncIterator[tuple[RedisBackend, RedisBackend]]:
    first, second = backend_on(kind, request), backend_on(kind, request)
    yield first, second
    await first.aclose()
    await second.aclose()


@pytest.fixture
async def cluster_backends(request: pytest.FixtureRequest) -> AsyncIterator[tuple[RedisBackend, RedisBackend]]:
    """Two clients on the private Redis Cluster, as two service instances would have."""
    async for pair in _two_on("cluster", request):
        yield pair


@pytest.fixture
async def sentinel_backends(request: pytest.FixtureRequest) -> AsyncIterator[tuple[RedisBackend, RedisBackend]]:
    """Two clients on the private Sentinel set's primary."""
    async for pair in _two_on("sentinel", request):
        yield pair


@pytest.fixture(params=["local", "redis-two-instances", "cluster-two-instances", "sentinel-two-instances"])
def locks(request: pytest.FixtureRequest) -> tuple[TurnLock, TurnLock]:
    """Two lock objects that must exclude each other."""
    if request.param == "local":
        lock = LocalTurnLock(wait_seconds=0.3)
        return lock, lock
    if request.param == "redis-two-instances":
        first, second = request.getfixturevalue("backends")
    else:
        first, second = request.getfixturevalue(f"{request.param.split('-')[0]}_backends")
    # The cluster client spends more CPU per command; on a busy two-core machine six queued turns
    # can take longer than 0.3 s there (the 409 test below still sees the wait run out).
    wait = 0.3 if request.param == "redis-two-instances" else 2.0
    return (
        RedisTurnLock(first, wait_seconds=wait, lease_seconds=5, poll_seconds=0.005),
        RedisTurnLock(second, wait_seconds=wait, lease_seconds=5, poll_seconds=0.005),
    )


async def test_turns_on_one_conversation_never_overlap(locks: tuple[TurnLock, TurnLock]) -> None:
    conversation = uuid.uuid4()
    inside = 0
    most = 0
    order: list[int] = []

    async def turn(n: int, lock: TurnLock) -> None:
        nonlocal inside, most
        async with lock.hold(conversation):
            inside += 1
            most = max(most, inside)
            await asyncio.sleep(0.01)  # a turn doing work; the others must queue behind it
            order.append(n)
            inside -= 1

    await asyncio.gather(*(turn(n, locks[n % 2]) for n in range(6)))
    assert most == 1 and sorted(order) == list(range(6))


async def test_other_conversations_are_not_blocked(locks: tuple[TurnLock, TurnLock]) -> None:
    first, second = uuid.uuid4(), uuid.uuid4()
    async with locks[0].hold(first):
        async with asyncio.timeout(1):
            async with locks[1].hold(second):
                pass


async def test_a_wait_that_runs_out_is_a_409_conflict(locks: tuple[TurnLock, TurnLock]) -> None:
    conversation = uuid.uuid4()
    async with locks[0].hold(conversation):
        with pytest.raises(Conflict) as caught:
            async with locks[1].hold(conversation):
                pass
    assert caught.value.code == "conversation_busy" and caught.value.status_code == 409
    async with locks[1].hold(conversation):  # and it is free again afterwards
        pass


async def test_redis_lease_is_renewed_while_the_turn_runs(backends: tuple[RedisBackend, RedisBackend]) -> None:
    """Without renewal a lease only ever counts down; renewal shows as its TTL going back up, and the
    lease outliving its first expiry. (The lease is a second long, renewed every third of it, so a
    loaded machine that delays one renewal by a few hundred ms does not lose it.)"""
    lease = 1.0
    holder = RedisTurnLock(backends[0], wait_seconds=0.2, lease_seconds=lease, poll_seconds=0.005)
    other = RedisTurnLock(backends[1], wait_seconds=0.05, lease_seconds=lease, poll_seconds=0.005)
    conversation = uuid.uuid4()
    key = keys.conversation_lock(conversation)
    loop = asyncio.get_running_loop()
    async with holder.hold(conversation):
        acquired = loop.time()
        ttls: list[int] = []
        renewals = 0

        async def renewed_past_its_first_expiry() -> bool:
            nonlocal renewals
            ttl = await backends[0].client.pttl(key)
            assert ttl > 0, f"the lease is gone while its turn still runs (ttl {ttl})"
            if ttls and ttl > ttls[-1]:
                renewals += 1
            ttls.append(ttl)
            return renewals >= 2 and loop.time() - acquired > 1.5 * lease

        await wait_for(renewed_past_its_first_expiry, timeout=10, what="the lease to be renewed past its first expiry")
        with pytest.raises(Conflict):
            async with other.hold(conversation):
                pass
    assert await backends[0].client.exists(key) == 0  # released by its owner


async def test_a_crashed_holder_s_lease_expires(backends: tuple[RedisBackend, RedisBackend]) -> None:
    conversation = uuid.uuid4()
    # A holder that died mid-turn: its lease is there, nobody renews it.
    await backends[0].client.set(keys.conversation_lock(conversation), b"dead-instance", px=200)
    lock = RedisTurnLock(backends[1], wait_seconds=2, lease_seconds=5, poll_seconds=0.01)
    async with asyncio.timeout(3):
        async with lock.hold(conversation):
            pass


async def test_redis_down_falls_back_to_this_instance(buffer_redis: RedisServer) -> None:
    buffer_redis.start()
    backend = contract_backend(buffer_redis.url)
    lock = RedisTurnLock(backend, wait_seconds=0.2, lease_seconds=5, poll_seconds=0.005)
    buffer_redis.stop()
    try:
        conversation = uuid.uuid4()
        async with lock.hold(conversation):
            with pytest.raises(Conflict):
                async with lock.hold(conversation):
                    pass
    finally:
        await backend.aclose()
        buffer_redis.start()
