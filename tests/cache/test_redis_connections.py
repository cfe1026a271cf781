"""`make_client` URLs against real servers: a password, an ACL user that may run no dangerous
command and touch only companion's keys, and TLS. Also the test server helper's own promises."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from companion.cache import keys
from companion.cache.backend import CacheUnavailable
from companion.cache.breaker import CircuitBreaker
from companion.cache.local import LocalCache
from companion.cache.redis import RedisBackend
from companion.cache.tiered import TieredCache
from tests.cache.helpers import FakeClock, Item, ItemCodec, Loader
from tests.support.redis_server import RedisServer
from tests.support.redis_topologies import contract_backend

USER = uuid.UUID("00000000-0000-4000-8000-0000000000cc")
# What the app needs and no more: its own keys and channel, no KEYS/FLUSHDB/CONFIG/DEBUG...
APP_ACL = "app on >app-pw ~companion:* &companion:* +@all -@dangerous +info +client|setname"


def _backend(url: str) -> RedisBackend:
    return contract_backend(url, breaker=CircuitBreaker(failure_threshold=1000, clock=FakeClock()))


async def _exercise(backend: RedisBackend) -> None:
    """Every kind of call the app makes, through the tiered cache and directly."""
    cache = TieredCache(backend, local=LocalCache())
    key = keys.personality(USER, "friendly")
    loaded = await cache.get_or_load(key, Loader(Item(name="friendly")), ItemCodec(), ttl=60, local_ttl=None)
    assert loaded == Item(name="friendly")
    assert await backend.get(key) is not None  # written by the set_if_locked script
    await cache.invalidate(key)
    await cache.invalidate_matching(keys.personality_pattern())
    assert cache.pending_invalidations == 0
    await backend.sadd(keys.session_index(USER), "s", 60)
    assert await backend.smembers(keys.session_index(USER)) == {"s"}
    assert await backend.incr(keys.token_quota(USER, "daily", "2026-11-28")) == 1
    assert await backend.mget([key]) == [None]
    assert await backend.ping() >= 0
    assert "keyspace_hits" in await backend.info()


@pytest.fixture(scope="module")
def password_server() -> Iterator[RedisServer]:
    with RedisServer(password="p@ss:w/rd") as server:
        yield server


@pytest.fixture(scope="module")
def acl_server() -> Iterator[RedisServer]:
    with RedisServer(acl=["default off", APP_ACL], username="app", password="app-pw") as server:
        yield server


@pytest.fixture(scope="module")
def tls_server() -> Iterator[RedisServer]:
    with RedisServer(tls=True) as server:
        yield server


async def test_a_password_url_connects(password_server: RedisServer) -> None:
    assert password_server.url.startswith("redis://:")
    backend = _backend(password_server.url)
    try:
        await _exercise(backend)
    finally:
        await backend.aclose()


async def test_a_wrong_password_is_cache_unavailable(password_server: RedisServer) -> None:
    backend = _backend(f"redis://:wrong@127.0.0.1:{password_server.port}/0")
    try:
        with pytest.raises(CacheUnavailable):
            await backend.get(keys.preferences(USER))
    finally:
        await backend.aclose()


async def test_an_acl_user_without_dangerous_commands_can_run_everything_the_app_needs(acl_server: RedisServer) -> None:
    assert acl_server.url.startswith(f"redis://app:{acl_server.password}@")
    backend = _backend(acl_server.url)
    try:
        await _exercise(backend)
    finally:
        await backend.aclose()


async def test_an_acl_user_cannot_touch_keys_outside_companions_prefix(acl_server: RedisServer) -> None:
    backend = contract_backend(acl_server.url, breaker=CircuitBreaker(failure_threshold=1000, clock=FakeClock()))
    try:
        with pytest.raises(CacheUnavailable):
            await backend.get("someone-else:key")
    finally:
        await backend.aclose()


async def test_a_rediss_url_connects_over_tls(tls_server: RedisServer) -> None:
    assert tls_server.url.startswith("rediss://")
    backend = _backend(tls_server.url)
    try:
        await _exercise(backend)
    finally:
        await backend.aclose()


async def test_plain_text_to_a_tls_port_is_cache_unavailable(tls_server: RedisServer) -> None:
    backend = _backend(f"redis://127.0.0.1:{tls_server.port}/0")
    try:
        with pytest.raises(CacheUnavailable):
            await backend.get(keys.preferences(USER))
    finally:
        await backend.aclose()


def test_the_private_server_is_never_the_shared_one_and_restarts_on_its_port(redis_server: RedisServer) -> None:
    assert redis_server.port != 6379
    port = redis_server.port
    redis_server.stop()
    assert not redis_server.running
    redis_server.start()
    assert redis_server.port == port and redis_server.running
    client = redis_server.sync_client()
    try:
        assert client.ping()
    finally:
        client.close()


def test_the_private_server_keeps_data_over_a_restart_only_when_asked(
    redis_server: RedisServer, redis_url: str
) -> None:
    client = redis_server.sync_client()
    try:
        client.set("companion:v1:kept", b"1")
        redis_server.stop(keep_data=True)
        redis_server.start()
        assert client.get("companion:v1:kept") == b"1"
        redis_server.stop()
        redis_server.start()
        assert client.get("companion:v1:kept") is None
    finally:
        client.close()
