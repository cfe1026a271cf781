"""Invalidation on a Redis Cluster and behind Sentinel: an instance's invalidation reaches the other
instance's L1 (classic PUBLISH, broadcast to every node); when the node a listener is subscribed to
is killed, the listener clears and bypasses L1, subscribes on another node by itself, and messages
published after that arrive again. Not only the happy path: the reconnect is what redis-py's
cluster pub/sub has got wrong before."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import redis

from companion.cache import keys
from companion.cache.breaker import CircuitBreaker
from companion.cache.invalidation import InvalidationListener
from companion.cache.local import MISSING, LocalCache
from companion.cache.redis import RedisBackend
from companion.cache.tiered import TieredCache
from companion.cache.topology import make_topology
from tests.cache.helpers import FakeClock, Item, ItemCodec, Loader
from tests.support.live import wait_for
from tests.support.redis_topologies import LocalCluster, LocalSentinelSet, topology_options

CODEC = ItemCodec()
OLD, NEW = Item(name="friendly", version=1), Item(name="friendly", version=2)


@dataclass
class Instance:
    cache: TieredCache
    listener: InvalidationListener

    async def get(self, key: str, loader: Loader) -> Item | None:
        return await self.cache.get_or_load(key, loader, CODEC, ttl=60, local_ttl=30, miss_ttl=10)


async def _instances(options: object, count: int = 2) -> AsyncIterator[list[Instance]]:
    made: list[tuple[Instance, RedisBackend]] = []
    for index in range(count):
        topology = make_topology(options)  # type: ignore[arg-type]
        backend = RedisBackend(
            topology.client, topology=topology, breaker=CircuitBreaker(clock=FakeClock()), timeout=2.0
        )
        cache = TieredCache(backend, local=LocalCache(), instance_id=f"instance-{index}")
        listener = InvalidationListener(topology, cache, retry_seconds=0.05, max_retry_seconds=0.2)
        listener.start()
        made.append((Instance(cache, listener), backend))
    try:
        for instance, _ in made:
            await wait_for(instance.listener.connected.is_set, timeout=20, what="the listener to subscribe")
        yield [instance for instance, _ in made]
    finally:
        for instance, backend in made:
            async with asyncio.timeout(10):
                await instance.listener.aclose()
            await backend.aclose()


@pytest.fixture
async def on_cluster(redis_cluster: LocalCluster) -> AsyncIterator[list[Instance]]:
    redis_cluster.flush()
    async for instances in _instances(topology_options("cluster", cluster=redis_cluster)):
        yield instances
    redis_cluster.heal()


@pytest.fixture
async def on_sentinel(redis_sentinels: LocalSentinelSet) -> AsyncIterator[list[Instance]]:
    redis_sentinels.flush()
    async for instances in _instances(topology_options("sentinel", sentinels=redis_sentinels)):
        yield instances


async def _invalidation_reaches(writer: Instance, reader: Instance) -> None:
    """`reader` holds a key in L1; `writer` invalidates it; `reader` drops it (deadline, no sleep)."""
    key = keys.personality(uuid.uuid4(), "friendly")

    async def held() -> bool:
        # After a reconnect, both instances drop every cached namespace once (and tell the others
        # to clear their L1): an entry may be dropped right after it was taken, so take it again.
        return await reader.get(key, Loader(OLD)) == OLD and reader.cache.local.get(key) == OLD

    await wait_for(held, timeout=10, what="the reader to hold the key in L1")
    await writer.cache.invalidate(key)
    await wait_for(lambda: reader.cache.local.get(key) is MISSING, timeout=10, what="the invalidation to arrive")
    assert await reader.get(key, Loader(NEW)) == NEW


@pytest.mark.parametrize("direction", ["first-to-second", "second-to-first"])
async def test_an_invalidation_reaches_the_other_instance_on_a_cluster(
    on_cluster: list[Instance], direction: str
) -> None:
    first, second = on_cluster
    writer, reader = (first, second) if direction == "first-to-second" else (second, first)
    await _invalidation_reaches(writer, reader)


async def test_an_invalidation_reaches_the_other_instance_behind_sentinel(on_sentinel: list[Instance]) -> None:
    await _invalidation_reaches(*on_sentinel)


def _subscriptions(cluster: LocalCluster) -> int:
    """How many connections are subscribed to the invalidation channel, over every node."""
    total = 0
    for node in cluster.nodes:
        if node.running:
            with node.client() as client:
                total += int(client.execute_command("PUBSUB", "NUMSUB", keys.INVALIDATION_CHANNEL)[1])
    return total


def _subscribed_node(cluster: LocalCluster) -> list[int]:
    """Ports of the nodes where someone is subscribed to the invalidation channel."""
    ports = []
    for node in cluster.nodes:
        if not node.running:
            continue
        with node.client() as client:
            counts = client.execute_command("PUBSUB", "NUMSUB", keys.INVALIDATION_CHANNEL)
            if int(counts[1]) > 0:
                ports.append(node.port)
    return ports


async def test_a_listener_whose_node_is_killed_resubscribes_on_another_and_receives_again(
    redis_cluster: LocalCluster, on_cluster: list[Instance]
) -> None:
    writer, reader = on_cluster
    subscribed = _subscribed_node(redis_cluster)
    assert subscribed, "no listener subscription found on any node"
    # Kill the node the reader listens on (its connection is the one we can find by client name
    # only through CLIENT LIST; both listeners' nodes are killed if they differ, which is harsher).
    key = keys.personality(uuid.uuid4(), "friendly")
    assert await reader.get(key, Loader(OLD)) == OLD
    for port in subscribed:
        redis_cluster.kill(port)
    # The reader notices (its connection broke), clears and bypasses L1...
    await wait_for(lambda: not reader.listener.connected.is_set(), timeout=20, what="the reader to notice")
    assert reader.cache.local.get(key) is MISSING
    # ...and subscribes again, on a node that is alive, without anyone's help.
    await wait_for(reader.listener.connected.is_set, timeout=30, what="the reader to resubscribe")
    await wait_for(writer.listener.connected.is_set, timeout=30, what="the writer to resubscribe")
    assert not set(_subscribed_node(redis_cluster)) & set(subscribed)
    # Messages flow again, both ways (the cluster may still be failing over: allow for retries).
    redis_cluster.wait_ready(timeout=60)
    for attempt in range(2):
        try:
            await _invalidation_reaches(writer, reader)
            await _invalidation_reaches(reader, writer)
            break
        except AssertionError:
            if attempt:
                raise


async def test_the_listener_survives_a_node_restart_under_redis_py_auto_reconnect(
    redis_cluster: LocalCluster, on_cluster: list[Instance]
) -> None:
    """redis-py's PubSub resubscribes by itself when its connection comes back: the listener sees
    the second `subscribe` confirmation and treats it as a gap (clears L1), then still receives."""
    writer, reader = on_cluster
    subscribed = _subscribed_node(redis_cluster)
    for port in subscribed:
        with redis_cluster.node(port).client() as client:
            # Drop the pub/sub connections only (the node stays up): a network blip.
            for entry in client.client_list():
                if int(entry.get("sub", 0)) > 0:
                    try:
                        client.client_kill_filter(_id=entry["id"])
                    except redis.RedisError:
                        pass
    # Both listeners' subscriptions are gone now; wait until both are back (whichever way: redis-py's
    # own reconnect, or the listener's), and their L1s trusted again.
    await wait_for(lambda: _subscriptions(redis_cluster) >= 2, timeout=30, what="both subscriptions back")
    for instance in (reader, writer):
        await wait_for(instance.listener.connected.is_set, timeout=30, what="the listener to be connected")
        await wait_for(lambda i=instance: i.cache.local.enabled, timeout=30, what="L1 to be trusted again")
    await _invalidation_reaches(writer, reader)
