"""The invalidation listener on the private Redis: what another instance invalidates leaves this
instance's L1 at once; while the channel is down L1 is cleared and bypassed; when Redis is back the
listener reconnects by itself, starts from an empty L1 and replays what could not be sent."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis

from companion.cache import keys
from companion.cache.breaker import CircuitBreaker
from companion.cache.invalidation import InvalidationListener
from companion.cache.local import MISSING, LocalCache
from companion.cache.redis import RedisBackend
from companion.cache.tiered import TieredCache
from tests.cache.helpers import FakeClock, HoldingProxy, Item, ItemCodec, Loader
from tests.support.live import wait_for
from tests.support.redis_server import RedisServer
from tests.support.redis_topologies import CONTRACT_TIMEOUT_MS, contract_client

USER = uuid.UUID("00000000-0000-4000-8000-0000000000bb")
KEY = keys.personality(USER, "friendly")
CODEC = ItemCodec()
OLD, NEW = Item(name="friendly", version=1), Item(name="friendly", version=2)
DELIVERY_DEADLINE = 0.5  # seconds; a healthy loopback delivers in about a millisecond


@dataclass
class Instance:
    """One app instance's cache: its TieredCache and, when listening, its listener."""

    cache: TieredCache
    listener: InvalidationListener | None = None

    async def get(self, loader: Loader, key: str = KEY) -> Item | None:
        return await self.cache.get_or_load(key, loader, CODEC, ttl=60, local_ttl=30, miss_ttl=10)


async def _close(listener: InvalidationListener) -> None:
    """Stop a listener; a listener that cannot be stopped fails the test instead of hanging it."""
    async with asyncio.timeout(10):
        await listener.aclose()


def _cache(client: aioredis.Redis, name: str) -> TieredCache:
    backend = RedisBackend(client, breaker=CircuitBreaker(clock=FakeClock()), timeout=CONTRACT_TIMEOUT_MS / 1000)
    return TieredCache(backend, local=LocalCache(), instance_id=name)


@pytest.fixture
async def mine(redis_url: str) -> AsyncIterator[Instance]:
    """This instance: a cache whose listener is connected."""
    client = contract_client(redis_url)
    cache = _cache(client, "mine")
    listener = InvalidationListener(client, cache, retry_seconds=0.02, max_retry_seconds=0.1)
    listener.start()
    try:
        await wait_for(listener.connected.is_set, what="the listener to subscribe")
        yield Instance(cache, listener)
    finally:
        await _close(listener)
        await client.aclose()


@pytest.fixture
async def theirs(redis_url: str) -> AsyncIterator[Instance]:
    """Another instance, which writes and invalidates."""
    client = contract_client(redis_url)
    yield Instance(_cache(client, "theirs"))
    await client.aclose()


async def test_l1_is_bypassed_until_the_listener_is_subscribed(redis_url: str) -> None:
    client = contract_client(redis_url)
    cache = _cache(client, "mine")
    listener = InvalidationListener(client, cache)
    try:
        listener.start()
        assert cache.local.enabled is False
        await wait_for(listener.connected.is_set, what="the listener to subscribe")
        assert cache.local.enabled is True
    finally:
        await _close(listener)
        await client.aclose()


async def test_an_invalidation_by_another_instance_reaches_this_l1_at_once(mine: Instance, theirs: Instance) -> None:
    loader = Loader(OLD)
    assert await mine.get(loader) == OLD
    assert mine.cache.local.get(KEY) == OLD
    loader.value = NEW
    await theirs.cache.invalidate(KEY)
    await wait_for(lambda: mine.cache.local.get(KEY) is MISSING, timeout=DELIVERY_DEADLINE, what="the invalidation")
    assert await mine.get(loader) == NEW


async def test_a_pattern_invalidation_by_another_instance_clears_this_l1(mine: Instance, theirs: Instance) -> None:
    await mine.get(Loader(OLD))
    await mine.get(Loader(OLD), keys.preferences(USER))
    await theirs.cache.invalidate_matching(keys.personality_pattern("friendly"))
    await wait_for(lambda: len(mine.cache.local) == 0, timeout=DELIVERY_DEADLINE, what="the invalidation")


async def test_a_malformed_message_on_the_channel_does_not_disconnect_the_listener(
    mine: Instance, theirs: Instance, redis_client: aioredis.Redis
) -> None:
    await mine.get(Loader(OLD))
    for garbage in (b"[1, 2]", b"null", b"\xff\xfe", b'{"k": 5}'):
        await redis_client.publish(keys.INVALIDATION_CHANNEL, garbage)
    await theirs.cache.invalidate(KEY)
    await wait_for(lambda: mine.cache.local.get(KEY) is MISSING, timeout=DELIVERY_DEADLINE, what="the invalidation")
    assert mine.listener is not None and mine.listener.connected.is_set()


async def test_stopping_redis_clears_l1_and_bypasses_it(redis_server: RedisServer, mine: Instance) -> None:
    loader = Loader(OLD)
    await mine.get(loader)
    assert len(mine.cache.local) == 1
    redis_server.stop()
    assert mine.listener is not None
    listener = mine.listener
    await wait_for(
        lambda: not mine.cache.local.enabled and len(mine.cache.local) == 0 and not listener.connected.is_set(),
        what="the listener to notice that Redis is gone",
    )
    # Meanwhile reads come from the loader, and nothing is kept in L1.
    assert await mine.get(loader) == OLD
    assert len(mine.cache.local) == 0
    assert loader.calls == 2


async def test_after_a_restart_the_listener_reconnects_by_itself_and_replays_what_was_pending(
    redis_server: RedisServer, mine: Instance, theirs: Instance
) -> None:
    assert mine.listener is not None
    listener = mine.listener
    loader = Loader(OLD)
    await mine.get(loader)
    redis_server.stop(keep_data=True)  # Redis will come back with the old value in it
    await wait_for(lambda: not mine.cache.local.enabled, what="L1 to be bypassed")
    loader.value = NEW
    await mine.cache.invalidate(KEY)  # a write on this instance during the outage
    assert mine.cache.pending_invalidations >= 1

    redis_server.start()
    await wait_for(
        lambda: listener.connected.is_set() and mine.cache.local.enabled and mine.cache.pending_invalidations == 0,
        what="the listener to reconnect and replay",
    )
    assert len(mine.cache.local) == 0
    assert await theirs.cache.backend.get(KEY) is None  # replayed: the old value is gone for everyone
    assert await theirs.get(loader) == NEW
    # ...and the channel works again.
    await mine.get(loader)
    await theirs.cache.invalidate(KEY)
    await wait_for(lambda: mine.cache.local.get(KEY) is MISSING, timeout=DELIVERY_DEADLINE, what="the invalidation")


async def test_a_subscription_restored_behind_the_listeners_back_still_clears_l1(
    mine: Instance, redis_client: aioredis.Redis
) -> None:
    """redis-py reconnects and resubscribes a pubsub connection by itself when it can; whatever
    was published in between was missed, so L1 must be dropped then too."""
    await mine.get(Loader(OLD))
    assert len(mine.cache.local) == 1
    await redis_client.client_kill_filter(_type="pubsub")
    await wait_for(lambda: len(mine.cache.local) == 0, what="L1 to be cleared")

    async def subscribed() -> bool:
        return (
            dict(await redis_client.pubsub_numsub(keys.INVALIDATION_CHANNEL)).get(keys.INVALIDATION_CHANNEL.encode())
            == 1
        )

    await wait_for(subscribed, what="the subscription to be back")
    await wait_for(lambda: mine.cache.local.enabled, what="L1 to be used again")


async def test_an_invalidation_published_before_redis_confirmed_the_subscription_is_not_missed(
    redis_server: RedisServer, redis_url: str, theirs: Instance
) -> None:
    """The listener must not trust L1 when SUBSCRIBE has merely been sent: until Redis has run it,
    a publish reaches no one."""
    proxy = HoldingProxy(redis_server.port, hold=b"SUBSCRIBE")
    await proxy.start()
    listening = contract_client(proxy.url)
    direct = contract_client(redis_url)
    cache = TieredCache(
        RedisBackend(direct, timeout=CONTRACT_TIMEOUT_MS / 1000), local=LocalCache(), instance_id="mine"
    )
    mine = Instance(cache)
    listener = InvalidationListener(listening, cache, retry_seconds=0.02, max_retry_seconds=0.1)
    try:
        listener.start()
        await wait_for(proxy.held.is_set, what="SUBSCRIBE to be sent")
        loader = Loader(OLD)
        assert await mine.get(loader) == OLD  # read while the subscription is not in place yet
        loader.value = NEW
        await theirs.cache.invalidate(KEY)  # published to no one
        proxy.release()
        await wait_for(listener.connected.is_set, what="the listener to subscribe")
        assert await mine.get(loader) == NEW
    finally:
        proxy.release()
        await _close(listener)
        await listening.aclose()
        await direct.aclose()
        await proxy.aclose()


async def test_aclose_stops_the_listener(redis_url: str, redis_client: aioredis.Redis) -> None:
    client = contract_client(redis_url)
    listener = InvalidationListener(client, _cache(client, "mine"))
    listener.start()
    await wait_for(listener.connected.is_set, what="the listener to subscribe")
    await _close(listener)

    async def unsubscribed() -> bool:
        counts = dict(await redis_client.pubsub_numsub(keys.INVALIDATION_CHANNEL))
        return counts.get(keys.INVALIDATION_CHANNEL.encode()) == 0

    await wait_for(unsubscribed, what="the subscription to end")
    await client.aclose()
