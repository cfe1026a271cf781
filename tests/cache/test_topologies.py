"""The topology factory (`companion.cache.topology`) against real servers: REDIS_MODE=auto tells a
cluster from a single server, every Lua script companion runs touches one slot on a real cluster
(no CROSSSLOT can reach a user), keys spread over every primary, and the sentinel options carry
REDIS_URL's password and TLS settings."""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import hashlib
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
from redis.exceptions import ResponseError

import companion
from companion.cache import keys
from companion.cache.backend import CacheUnavailable
from companion.cache.local import LocalCache
from companion.cache.redis import RedisBackend
from companion.cache.tiered import TieredCache
from companion.cache.topology import (
    ClusterTopology,
    RedisOptions,
    StandaloneTopology,
    distrust_after_failover,
    make_topology,
    parse_sentinels,
    sentinel_connection_kwargs,
)
from companion.conversations.buffer import BufferedMessage, RedisConversationBuffer
from companion.conversations.turns import RedisTurnLock
from companion.ratelimit.limiter import Limit, RedisRateLimiter
from companion.ratelimit.quotas import TokenQuotas
from companion.storage.database import Database
from tests.support.live import wait_for
from tests.support.redis_server import RedisServer
from tests.support.redis_topologies import (
    CONTRACT_TIMEOUT_MS,
    LocalCluster,
    LocalSentinelSet,
    free_port,
    topology_options,
)

# Detection and routing, not speed: the contract suites' timeouts, not the service's 250 ms.
GENEROUS = {"socket_timeout_ms": CONTRACT_TIMEOUT_MS, "connect_timeout_ms": CONTRACT_TIMEOUT_MS}


def _scripts_in_companion() -> set[str]:
    """Every Lua script in the package: module-level string constants that call redis."""
    found = set()
    for path in Path(companion.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and "redis.call(" in node.value:
                found.add(node.value)
    return found


@pytest.fixture
async def cluster_backend(redis_cluster: LocalCluster) -> AsyncIterator[RedisBackend]:
    redis_cluster.flush()
    topology = make_topology(topology_options("cluster", cluster=redis_cluster))
    backend = RedisBackend(topology.client, topology=topology, timeout=2.0)
    yield backend
    await backend.aclose()


def _ttl_jumps_up(backend: RedisBackend, key: str) -> Callable[[], Awaitable[bool]]:
    seen: list[int] = []

    async def jumped() -> bool:
        seen.append(int(await backend.client.pttl(key)))
        return len(seen) > 1 and seen[-1] > seen[-2]

    return jumped


def _on_primaries(cluster: LocalCluster, *command: str) -> list[object]:
    answers = []
    for client in cluster.primary_clients():
        with client:
            answers.append(client.execute_command(*command))
    return answers


async def test_auto_detects_a_cluster(redis_cluster: LocalCluster) -> None:
    topology = make_topology(RedisOptions(url=redis_cluster.url, mode="auto", **GENEROUS))
    try:
        assert isinstance(topology, ClusterTopology)
        assert (await topology.status())["cluster_state"] == "ok"
    finally:
        await topology.aclose()


async def test_auto_takes_a_single_server_as_standalone(redis_server: RedisServer) -> None:
    redis_server.start()
    topology = make_topology(RedisOptions(url=redis_server.url, mode="auto", **GENEROUS))
    try:
        assert isinstance(topology, StandaloneTopology)
        assert await topology.status() == {"mode": "standalone"}
    finally:
        await topology.aclose()


async def test_auto_with_redis_unreachable_at_start_says_it_did_not_detect() -> None:
    topology = make_topology(RedisOptions(url=f"redis://127.0.0.1:{free_port()}/0", mode="auto"))
    try:
        assert await topology.status() == {"mode": "standalone", "detected": False}
    finally:
        await topology.aclose()


async def test_every_lua_script_runs_on_the_cluster_without_crossslot(
    redis_cluster: LocalCluster, cluster_backend: RedisBackend, tmp_path: Path
) -> None:
    """Each script through the code that runs it, with the keys that code builds, on a real
    cluster; then no primary has ever answered CROSSSLOT, and each script was loaded (so it ran)."""
    _on_primaries(redis_cluster, "SCRIPT", "FLUSH")
    _on_primaries(redis_cluster, "CONFIG", "RESETSTAT")
    user, conversation = uuid.uuid4(), uuid.uuid4()
    backend = cluster_backend

    # The tiered cache's set-if-still-locked: a value and its loader lock.
    key = keys.api_key("a" * 64)
    assert await backend.add(keys.lock(key), b"token", 5)
    assert await backend.set_if_locked(key, b"owner", 60, keys.lock(key), "token")
    # GCRA rate limiting.
    limiter = RedisRateLimiter(backend)
    assert (await limiter.hit(keys.rate_limit("chat", str(user)), Limit("chat", 5, 60))).allowed
    await limiter.peek(keys.rate_limit("chat", str(user)), Limit("chat", 5, 60))
    # Token quotas (the counter exists, so the database is never asked).
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'unused.db'}")
    try:
        quotas = TokenQuotas(database, backend, daily=1000, clock=lambda: datetime.now(UTC))
        counter = keys.token_quota(user, "daily", datetime.now(UTC).strftime("%Y%m%d"))
        await backend.set(counter, b"5", 3600)
        await quotas.charge(user, 7)
        assert await backend.get(counter) == b"12"
    finally:
        await database.dispose()
    # The conversation buffer: replace, append, recent.
    buffer = RedisConversationBuffer(backend, max_messages=4)
    await buffer.replace(conversation, [BufferedMessage(id=1, role="user", content="hi", at="1")])
    assert await buffer.append(
        conversation, BufferedMessage(id=2, role="assistant", content="hello", at="2"), after="1"
    )
    assert [m.id for m in await buffer.recent(conversation, 4) or []] == [1, 2]
    # The turn lease: acquire, renew while held, release.
    turns = RedisTurnLock(backend, wait_seconds=1, lease_seconds=0.15, poll_seconds=0.01)
    lease = keys.conversation_lock(conversation)
    async with turns.hold(conversation):
        # Renewed (every lease/3) while held: the TTL jumps back up at least once.
        await wait_for(_ttl_jumps_up(backend, lease), what="the lease to be renewed")
    assert await backend.get(lease) is None

    errors = "".join(str(client.info("errorstats")) for client in redis_cluster.primary_clients())
    assert "CROSSSLOT" not in errors, errors
    scripts = _scripts_in_companion()
    assert len(scripts) >= 8, "the scan for scripts found too few: is it still looking in the right place?"
    loaded = {
        script
        for script in scripts
        if any(_on_primaries(redis_cluster, "SCRIPT", "EXISTS", hashlib.sha1(script.encode()).hexdigest()))
    }
    missing = [script.strip().splitlines()[0] for script in scripts - loaded]
    assert not missing, f"scripts this test did not run on the cluster: {missing}"


async def test_a_script_over_two_slots_is_refused_so_the_check_above_can_fail(redis_cluster: LocalCluster) -> None:
    client = redis.RedisCluster(host="127.0.0.1", port=redis_cluster.primary_ports()[0])
    try:
        with pytest.raises((ResponseError, redis.RedisClusterException)):
            client.execute_command(
                "EVAL",
                "return redis.call('GET', KEYS[1])",
                2,
                keys.preferences(uuid.uuid4()),
                keys.preferences(uuid.uuid4()),
            )
    finally:
        client.close()


async def test_keys_of_many_users_land_on_every_primary(
    redis_cluster: LocalCluster, cluster_backend: RedisBackend
) -> None:
    for _ in range(60):
        await cluster_backend.set(keys.preferences(uuid.uuid4()), b"{}", 60)
    sizes = _on_primaries(redis_cluster, "DBSIZE")
    assert len(sizes) == 3 and all(int(str(size)) > 0 for size in sizes), sizes


async def test_delete_matching_and_info_cover_every_primary(
    redis_cluster: LocalCluster, cluster_backend: RedisBackend
) -> None:
    """What `companion cache invalidate` and `cache stats` rely on."""
    for _ in range(60):
        await cluster_backend.set(keys.personality(uuid.uuid4(), "friendly"), b"{}", 60)
        await cluster_backend.set(keys.conversation_buffer(uuid.uuid4()), b"[]", 60)
    assert await cluster_backend.delete_matching(keys.personality_pattern("friendly")) == 60
    assert sum(int(str(size)) for size in _on_primaries(redis_cluster, "DBSIZE")) == 60  # the buffers stay
    info = await cluster_backend.info()
    assert info["primaries"] == 3
    memory = sum(int(client.info("memory")["used_memory"]) for client in redis_cluster.primary_clients())
    assert info["used_memory"] == pytest.approx(memory, rel=0.5)


def test_parse_sentinels() -> None:
    assert parse_sentinels("a:1, b:2,[::1]:3") == (("a", 1), ("b", 2), ("::1", 3))


def test_sentinel_mode_takes_password_database_and_tls_from_redis_url() -> None:
    password = secrets.token_hex(8)  # made at run time: no credential-shaped URL in the repository
    options = RedisOptions(
        url=f"rediss://app:{password}@ignored.example:1/2?ssl_ca_certs=/etc/ca.pem",
        mode="sentinel",
        sentinels=(("127.0.0.1", 26379),),
    )
    primary, sentinels = sentinel_connection_kwargs(options)
    assert "host" not in primary and "port" not in primary
    assert (primary["username"], primary["password"], primary["db"], primary["ssl"]) == ("app", password, 2, True)
    assert primary["ssl_ca_certs"] == "/etc/ca.pem"
    # The sentinels get the TLS options, and only their own password.
    assert sentinels["ssl"] is True and sentinels["ssl_ca_certs"] == "/etc/ca.pem"
    assert "password" not in sentinels
    _, with_password = sentinel_connection_kwargs(
        RedisOptions(url=options.url, mode="sentinel", sentinels=options.sentinels, sentinel_password="sentinel-pw")
    )
    assert with_password["password"] == "sentinel-pw"


async def test_sentinel_mode_with_a_password_follows_redis_url(tmp_path: Path) -> None:
    """The primary requires a password: REDIS_URL's is used for it (the sentinels have none)."""
    sentinels = LocalSentinelSet(tmp_path / "sentinels", password="s3cret-pw", sentinels=3)
    await asyncio.to_thread(sentinels.start)
    try:
        options = topology_options("sentinel", sentinels=sentinels)
        assert "s3cret-pw" in options.url
        topology = make_topology(options)
        backend = RedisBackend(topology.client, topology=topology, timeout=CONTRACT_TIMEOUT_MS / 1000)
        try:
            await backend.set(keys.preferences(uuid.uuid4()), b"{}", 60)
            assert (await backend.describe())["primary"] == f"127.0.0.1:{sentinels.primary_port()}"
        finally:
            await backend.aclose()
        wrong = make_topology(dataclasses.replace(options, url=options.url.replace("s3cret-pw", "wrong")))
        refused = RedisBackend(wrong.client, topology=wrong)
        try:
            with pytest.raises(CacheUnavailable):
                await refused.set(keys.preferences(uuid.uuid4()), b"{}", 60)
        finally:
            await refused.aclose()
    finally:
        await asyncio.to_thread(sentinels.cleanup)


async def test_a_recovery_after_an_outage_drops_cached_entries_a_promoted_replica_may_still_hold(
    cluster_backend: RedisBackend,
) -> None:
    """`distrust_after_failover`: a replica promoted after its primary died may lack the primary's
    last deletes, so after an outage that opened the circuit every cached namespace is dropped (and
    every L1 told); durable state (buffers) stays, and a mere slow call changes nothing."""
    cache = TieredCache(cluster_backend, local=LocalCache())
    cluster_backend.on_recovery.append(distrust_after_failover(cluster_backend, cache))
    cached, durable = keys.personality(uuid.uuid4(), "friendly"), keys.conversation_buffer(uuid.uuid4())
    await cluster_backend.set(cached, b"{}", 60)
    await cluster_backend.set(durable, b"[]", 60)
    cluster_backend.breaker.record_failure()  # one failure: the circuit stays closed
    await cluster_backend.get(cached)  # the success after it is a "recovery", but no outage
    assert await cluster_backend.get(cached) == b"{}"
    for _ in range(cluster_backend.breaker.failure_threshold):
        cluster_backend.breaker.record_failure()
    assert cluster_backend.breaker.state == "open"
    cluster_backend.breaker.reset_seconds = 0  # let the next call be the trial at once
    await cluster_backend.get(durable)  # Redis answers: recovery after an outage
    assert await cluster_backend.get(cached) is None
    assert await cluster_backend.get(durable) == b"[]"


async def test_a_command_during_a_slot_map_reload_is_unavailable_not_a_crash(
    cluster_backend: RedisBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While redis-py reloads the slot map (a failover), its tables are briefly empty and a lookup in
    them raises KeyError (seen in the failover runs; the timing cannot be forced, so the lookup is
    made to fail as it does then): the command must surface as CacheUnavailable (served without
    Redis), never as a KeyError that becomes a 500."""
    key = keys.preferences(uuid.uuid4())
    await cluster_backend.set(key, b"{}", 60)
    manager = cluster_backend.client.nodes_manager

    def half_reloaded(self: object, slot: int, *args: object, **kwargs: object) -> object:
        return {}[slot]  # the KeyError of an emptied slots_cache

    with monkeypatch.context() as patch:
        patch.setattr(type(manager), "get_node_from_slot", half_reloaded)
        with pytest.raises(CacheUnavailable):
            await cluster_backend.get(key)
    assert await cluster_backend.get(key) == b"{}"
