"""The contract both cache backends keep, run against MemoryBackend and the real RedisBackend (a
private redis-server): the same operations give the same results and store the same bytes. Then
what only Redis can do: fail. A stopped server surfaces as CacheUnavailable, and the circuit
breaker stops calling it until a trial call succeeds."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from companion.cache import keys
from companion.cache.backend import CacheUnavailable
from companion.cache.breaker import CircuitBreaker
from companion.cache.codec import ModelCodec
from companion.cache.memory import MemoryBackend
from companion.cache.redis import RedisBackend
from companion.cache.tiered import CACHED_NAMESPACES
from companion.personalities.schemas import PersonalityOut
from tests.cache.helpers import BackendCase, FakeClock
from tests.support.redis_server import RedisServer
from tests.support.redis_topologies import contract_backend

USER = uuid.UUID("00000000-0000-4000-8000-000000000001")
OTHER = uuid.UUID("00000000-0000-4000-8000-000000000002")
KEY = keys.preferences(USER)
BINARY = bytes(range(256)) + "é😀".encode() + b"\x00!"


# --- get / set / mget ------------------------------------------------------------------------------


async def test_get_of_a_missing_key_is_none(cache_backend: BackendCase) -> None:
    assert await cache_backend.backend.get(KEY) is None


async def test_set_then_get_returns_the_same_bytes(cache_backend: BackendCase) -> None:
    await cache_backend.backend.set(KEY, BINARY)
    assert await cache_backend.backend.get(KEY) == BINARY


async def test_set_overwrites_the_value(cache_backend: BackendCase) -> None:
    await cache_backend.backend.set(KEY, b"one")
    await cache_backend.backend.set(KEY, b"two")
    assert await cache_backend.backend.get(KEY) == b"two"


async def test_mget_returns_values_in_key_order_with_none_for_missing(cache_backend: BackendCase) -> None:
    backend = cache_backend.backend
    await backend.set(keys.preferences(USER), b"mine")
    await backend.set(keys.preferences(OTHER), b"theirs")
    found = await backend.mget([keys.preferences(OTHER), keys.personality(USER, "nope"), keys.preferences(USER)])
    assert found == [b"theirs", None, b"mine"]
    assert await backend.mget([]) == []


async def test_set_with_a_ttl_expires(cache_backend: BackendCase) -> None:
    backend = cache_backend.backend
    await backend.set(KEY, b"brief", cache_backend.short_ttl)
    assert await backend.get(KEY) == b"brief"
    await cache_backend.after_ttl(lambda: _is_gone(backend, KEY), key=KEY)


async def test_set_without_a_ttl_does_not_expire(cache_backend: BackendCase) -> None:
    backend = cache_backend.backend
    await backend.set(KEY, b"kept", 60)
    await backend.set(KEY, b"kept")  # a plain set drops the earlier TTL, as Redis SET does
    if cache_backend.redis is not None:
        assert await cache_backend.redis.pttl(KEY) == -1
    await cache_backend.still_there_for_a_while(lambda: _holds(backend, KEY, b"kept"))


# --- add (SET NX) ------------------------------------------------------------------------------------


async def test_add_sets_only_when_the_key_is_absent(cache_backend: BackendCase) -> None:
    backend = cache_backend.backend
    assert await backend.add(KEY, b"first", 60) is True
    assert await backend.add(KEY, b"second", 60) is False
    assert await backend.get(KEY) == b"first"


async def test_add_succeeds_again_once_the_first_value_expired(cache_backend: BackendCase) -> None:
    backend = cache_backend.backend
    assert await backend.add(KEY, b"first", cache_backend.short_ttl) is True
    await cache_backend.after_ttl(lambda: _is_gone(backend, KEY), key=KEY)
    assert await backend.add(KEY, b"second", 60) is True
    assert await backend.get(KEY) == b"second"


# --- set_if_locked ----------------------------------------------------------------------------------


async def test_set_if_locked_sets_the_value_and_releases_the_lock_while_the_token_matches(
    cache_backend: BackendCase,
) -> None:
    backend = cache_backend.backend
    assert await backend.add(keys.lock(KEY), b"token-1", 60)
    assert await backend.set_if_locked(KEY, b"loaded", 60, keys.lock(KEY), "token-1") is True
    assert await backend.get(KEY) == b"loaded"
    assert await backend.get(keys.lock(KEY)) is None


async def test_set_if_locked_is_refused_for_another_token(cache_backend: BackendCase) -> None:
    backend = cache_backend.backend
    assert await backend.add(keys.lock(KEY), b"token-1", 60)
    assert await backend.set_if_locked(KEY, b"loaded", 60, keys.lock(KEY), "token-2") is False
    assert await backend.get(KEY) is None
    assert await backend.get(keys.lock(KEY)) == b"token-1"


async def test_set_if_locked_is_refused_after_the_lock_was_deleted(cache_backend: BackendCase) -> None:
    """What an invalidation does to a loader that read the database before the write."""
    backend = cache_backend.backend
    assert await backend.add(keys.lock(KEY), b"token-1", 60)
    await backend.delete(KEY, keys.lock(KEY))
    assert await backend.set_if_locked(KEY, b"stale", 60, keys.lock(KEY), "token-1") is False
    assert await backend.get(KEY) is None


async def test_set_if_locked_gives_the_value_its_ttl(cache_backend: BackendCase) -> None:
    backend = cache_backend.backend
    assert await backend.add(keys.lock(KEY), b"token-1", 60)
    assert await backend.set_if_locked(KEY, b"loaded", cache_backend.short_ttl, keys.lock(KEY), "token-1")
    await cache_backend.after_ttl(lambda: _is_gone(backend, KEY), key=KEY)


# --- delete / expire / incr --------------------------------------------------------------------------


async def test_delete_removes_keys_and_counts_those_that_existed(cache_backend: BackendCase) -> None:
    backend = cache_backend.backend
    await backend.set(keys.preferences(USER), b"1")
    await backend.set(keys.preferences(OTHER), b"2")
    assert await backend.delete(keys.preferences(USER), keys.preferences(OTHER), keys.personality(USER, "x")) == 2
    assert await backend.mget([keys.preferences(USER), keys.preferences(OTHER)]) == [None, None]
    assert await backend.delete() == 0


async def test_expire_gives_an_existing_key_a_ttl(cache_backend: BackendCase) -> None:
    backend = cache_backend.backend
    await backend.set(KEY, b"value")
    assert await backend.expire(KEY, cache_backend.short_ttl) is True
    await cache_backend.after_ttl(lambda: _is_gone(backend, KEY), key=KEY)


async def test_expire_of_a_missing_key_is_false_and_creates_nothing(cache_backend: BackendCase) -> None:
    assert await cache_backend.backend.expire(KEY, 60) is False
    assert await cache_backend.backend.get(KEY) is None


async def test_incr_counts_up_from_zero(cache_backend: BackendCase) -> None:
    backend = cache_backend.backend
    assert [await backend.incr(KEY) for _ in range(3)] == [1, 2, 3]
    assert await backend.get(KEY) == b"3"


async def test_incr_keeps_the_keys_ttl(cache_backend: BackendCase) -> None:
    backend = cache_backend.backend
    await backend.set(KEY, b"41", cache_backend.short_ttl)
    assert await backend.incr(KEY) == 42
    await cache_backend.after_ttl(lambda: _is_gone(backend, KEY), key=KEY)


# --- sets -------------------------------------------------------------------------------------------


async def test_sadd_srem_smembers(cache_backend: BackendCase) -> None:
    backend = cache_backend.backend
    index = keys.session_index(USER)
    assert await backend.smembers(index) == set()
    for member in ("a", "b", "c", "a"):
        await backend.sadd(index, member)
    assert await backend.smembers(index) == {"a", "b", "c"}
    await backend.srem(index, "b")
    await backend.srem(index, "not-there")
    assert await backend.smembers(index) == {"a", "c"}
    await backend.srem(index, "a")
    await backend.srem(index, "c")
    assert await backend.smembers(index) == set()


async def test_sadd_with_a_ttl_expires_the_whole_set(cache_backend: BackendCase) -> None:
    backend = cache_backend.backend
    index = keys.session_index(USER)
    await backend.sadd(index, "a", 60)
    await backend.sadd(index, "b", cache_backend.short_ttl)  # the latest TTL wins

    async def empty() -> bool:
        return await backend.smembers(index) == set()

    await cache_backend.after_ttl(empty, key=index)


async def test_sadd_without_a_ttl_keeps_the_sets_ttl(cache_backend: BackendCase) -> None:
    backend = cache_backend.backend
    index = keys.session_index(USER)
    await backend.sadd(index, "a", cache_backend.short_ttl)
    await backend.sadd(index, "b")
    assert await backend.smembers(index) == {"a", "b"}

    async def empty() -> bool:
        return await backend.smembers(index) == set()

    await cache_backend.after_ttl(empty, key=index)


# --- delete_matching --------------------------------------------------------------------------------


async def test_delete_matching_deletes_only_the_matching_keys(cache_backend: BackendCase) -> None:
    backend = cache_backend.backend
    doomed = [keys.personality(USER, "a"), keys.personality(OTHER, "a"), keys.lock(keys.personality(USER, "a"))]
    kept = [
        keys.personality(USER, "ab"),
        keys.personality(USER, "b"),
        keys.preferences(USER),
        keys.session(USER, "a"),
        keys.api_key("a"),
    ]
    for key in doomed + kept:
        await backend.set(key, b"x")
    assert await backend.delete_matching(keys.personality_pattern("a")) == 2
    assert await backend.mget(doomed) == [None, None, b"x"]  # the exact name, not its loader lock
    assert await backend.mget(kept) == [b"x"] * len(kept)

    assert await backend.delete_matching(keys.personality_pattern()) == 3  # every personality entry
    assert await backend.mget(kept) == [None, None, b"x", b"x", b"x"]


async def test_delete_matching_a_hostile_name_deletes_only_that_names_entry(cache_backend: BackendCase) -> None:
    backend = cache_backend.backend
    hostile = keys.personality(USER, "a*")
    others = [keys.personality(USER, "a"), keys.personality(USER, "ab"), keys.personality(USER, "b")]
    for key in [hostile, *others]:
        await backend.set(key, b"x")
    assert await backend.delete_matching(keys.personality_pattern("a*")) == 1
    assert await backend.get(hostile) is None
    assert await backend.mget(others) == [b"x"] * 3


async def test_delete_matching_many_keys_deletes_them_all(cache_backend: BackendCase) -> None:
    """More keys than one SCAN/UNLINK batch (500)."""
    backend = cache_backend.backend
    for index in range(1203):
        await backend.set(keys.personality(uuid.UUID(int=index + 1), "p"), b"x")
    await backend.set(keys.preferences(USER), b"kept")
    assert await backend.delete_matching(keys.namespace_pattern("personality")) == 1203
    assert await backend.get(keys.personality(uuid.UUID(int=7), "p")) is None
    assert await backend.get(keys.preferences(USER)) == b"kept"


async def test_the_cached_namespace_patterns_never_match_durable_state(cache_backend: BackendCase) -> None:
    """After an outage every cached namespace may be dropped wholesale (`namespace_pattern`); that
    must never take sessions, memory generations, quotas, rate limits or conversation state along."""
    backend = cache_backend.backend
    conversation = uuid.UUID(int=42)
    durable = [
        keys.session(USER, "0123456789abcdef"),
        keys.session_index(USER),
        keys.token_quota(USER, "daily", "2024-05-06"),
        keys.rate_limit("chat", str(USER)),
        keys.rate_limit("ip", "127.0.0.1"),
        keys.conversation_buffer(conversation),
        keys.conversation_summary(conversation),
        keys.conversation_lock(conversation),
    ]
    cached = [
        *(keys.personality(USER, name) for name in ("friendly", "prefs", "sessions", "memgen", "apikey", "a:*")),
        keys.lock(keys.personality(USER, "friendly")),
        keys.preferences(USER),
        keys.lock(keys.preferences(USER)),
        keys.api_key("f" * 64),
        keys.lock(keys.api_key("f" * 64)),
    ]
    for key in durable + cached:
        await backend.set(key, b"x")
    for namespace in CACHED_NAMESPACES:
        await backend.delete_matching(keys.namespace_pattern(namespace))
    assert await backend.mget(cached) == [None] * len(cached)
    assert await backend.mget(durable) == [b"x"] * len(durable)


@pytest.mark.parametrize("pattern", ["*", "*:personality:*", "companion:v2:*", "companion:v1*", "other:companion:v1:*"])
async def test_delete_matching_refuses_patterns_outside_the_companion_prefix(
    cache_backend: BackendCase, pattern: str
) -> None:
    backend = cache_backend.backend
    await backend.set(KEY, b"x")
    with pytest.raises(ValueError, match="outside the companion namespace"):
        await backend.delete_matching(pattern)
    assert await backend.get(KEY) == b"x"


async def test_redis_delete_matching_never_touches_keys_of_others(
    redis_backend: RedisBackend, redis_client: aioredis.Redis
) -> None:
    await redis_client.set("someone-else:companion:v1:x", b"theirs")
    await redis_client.set("companion:v2:x", b"next version")
    await redis_backend.set(KEY, b"ours")
    assert await redis_backend.delete_matching(keys.PREFIX + ":*") == 1
    assert await redis_client.get("someone-else:companion:v1:x") == b"theirs"
    assert await redis_client.get("companion:v2:x") == b"next version"


# --- bytes, publish, ping ------------------------------------------------------------------------------


async def test_both_backends_store_and_return_identical_bytes_for_an_encoded_model(
    redis_backend: RedisBackend, redis_client: aioredis.Redis
) -> None:
    codec = ModelCodec(PersonalityOut)
    model = PersonalityOut(
        id=str(uuid.uuid4()),
        name="zoe",
        display_name="Zoë 😀",
        description="",
        system_prompt='Say "hi"\n\ttabbed, ünïcode and a \\ backslash',
        scope="user",
        version=3,
        created_at=datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
        updated_at=datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
    )
    encoded = codec.encode(model)
    memory = MemoryBackend()
    key = keys.personality(USER, "zoë")
    await memory.set(key, encoded, 60)
    await redis_backend.set(key, encoded, 60)

    from_memory, from_redis = await memory.get(key), await redis_backend.get(key)
    assert from_memory == from_redis == encoded
    assert await redis_client.get(key) == encoded  # what Redis really holds
    assert codec.decode(from_redis) == model
    assert await memory.mget([key]) == await redis_backend.mget([key])


async def test_redis_publish_reaches_a_subscriber(redis_backend: RedisBackend, redis_client: aioredis.Redis) -> None:
    async with redis_client.pubsub() as pubsub:
        await pubsub.subscribe(keys.INVALIDATION_CHANNEL)
        confirmed = await pubsub.get_message(timeout=2.0)  # from here on, a publish reaches us
        assert confirmed is not None and confirmed["type"] == "subscribe"
        await redis_backend.publish(keys.INVALIDATION_CHANNEL, b'{"k":["x"]}')
        message = await pubsub.get_message(timeout=2.0)
        assert message is not None and (message["type"], message["data"]) == ("message", b'{"k":["x"]}')


async def test_memory_publish_keeps_what_would_have_travelled() -> None:
    backend = MemoryBackend()
    await backend.publish(keys.INVALIDATION_CHANNEL, b"m")
    assert backend.published == [(keys.INVALIDATION_CHANNEL, b"m")]


async def test_ping_returns_a_round_trip_in_ms(cache_backend: BackendCase) -> None:
    assert 0 <= await cache_backend.backend.ping() < 1000


async def test_memory_backend_evicts_the_least_recently_used_entry_beyond_max_entries() -> None:
    backend = MemoryBackend(max_entries=2)
    await backend.set("companion:v1:a", b"a")
    await backend.set("companion:v1:b", b"b")
    await backend.get("companion:v1:a")  # a is now the most recently used
    await backend.set("companion:v1:c", b"c")
    assert await backend.mget(["companion:v1:a", "companion:v1:b", "companion:v1:c"]) == [b"a", None, b"c"]


# --- failures (Redis only) -------------------------------------------------------------------------------


async def test_a_stopped_server_surfaces_as_cache_unavailable_never_a_redis_error(
    redis_server: RedisServer, redis_url: str
) -> None:
    breaker = CircuitBreaker(failure_threshold=1000, clock=FakeClock())  # every call reaches the network
    backend = contract_backend(redis_url, breaker=breaker)
    try:
        await backend.set(KEY, b"x")  # a pooled connection exists when the server goes
        redis_server.stop()
        operations = {
            "get": lambda: backend.get(KEY),
            "mget": lambda: backend.mget([KEY]),
            "set": lambda: backend.set(KEY, b"x", 1),
            "add": lambda: backend.add(KEY, b"x", 1),
            "set_if_locked": lambda: backend.set_if_locked(KEY, b"x", 1, keys.lock(KEY), "t"),
            "delete": lambda: backend.delete(KEY),
            "expire": lambda: backend.expire(KEY, 1),
            "incr": lambda: backend.incr(KEY),
            "sadd": lambda: backend.sadd(KEY, "m", 1),
            "srem": lambda: backend.srem(KEY, "m"),
            "smembers": lambda: backend.smembers(KEY),
            "delete_matching": lambda: backend.delete_matching(keys.personality_pattern()),
            "publish": lambda: backend.publish(keys.INVALIDATION_CHANNEL, b"m"),
            "ping": backend.ping,
            "info": backend.info,
        }
        for name, operation in operations.items():
            with pytest.raises(CacheUnavailable) as raised:
                await operation()
            assert isinstance(raised.value.__cause__, RedisError | OSError | TimeoutError), name
        assert breaker.state == "closed"
    finally:
        redis_server.start()
        await backend.aclose()


async def test_a_restarted_server_is_used_again_without_a_new_client(
    redis_server: RedisServer, redis_backend: RedisBackend
) -> None:
    await redis_backend.set(KEY, b"before")
    redis_server.stop()
    with pytest.raises(CacheUnavailable):
        await redis_backend.get(KEY)
    redis_server.start()
    await redis_backend.set(KEY, b"after")
    assert await redis_backend.get(KEY) == b"after"


async def test_breaker_opens_after_n_failures_and_then_refuses_calls_without_the_network(
    redis_server: RedisServer, redis_url: str
) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=3, reset_seconds=2.0, clock=clock)
    backend = contract_backend(redis_url, breaker=breaker)
    try:
        redis_server.stop()
        for _ in range(3):
            assert breaker.state == "closed"
            with pytest.raises(CacheUnavailable):
                await backend.get(KEY)
        assert breaker.state == "open"
        assert breaker.outages == 1
        # Redis is back, but the open circuit does not even try it: proof that no call goes out.
        redis_server.start()
        for _ in range(5):
            with pytest.raises(CacheUnavailable, match="circuit open"):
                await backend.get(KEY)
        clock.advance(1.9)
        with pytest.raises(CacheUnavailable, match="circuit open"):
            await backend.ping()
    finally:
        await backend.aclose()


async def test_breaker_half_opens_after_reset_and_closes_on_a_successful_trial(
    redis_server: RedisServer, redis_url: str
) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=2, reset_seconds=2.0, clock=clock)
    backend = contract_backend(redis_url, breaker=breaker)
    recoveries: list[str] = []

    async def on_recovery() -> None:
        recoveries.append("recovered")

    backend.on_recovery.append(on_recovery)
    try:
        redis_server.stop()
        for _ in range(2):
            with pytest.raises(CacheUnavailable):
                await backend.get(KEY)
        redis_server.start()
        clock.advance(2.0)
        assert breaker.state == "half_open"
        await backend.set(KEY, b"trial")  # the trial call goes through
        assert breaker.state == "closed"
        assert recoveries == ["recovered"]
        assert await backend.get(KEY) == b"trial"
        await backend.ping()
        assert recoveries == ["recovered"]  # once per recovery, not per call
    finally:
        await backend.aclose()


async def test_breaker_stays_open_when_the_trial_call_fails(redis_server: RedisServer, redis_url: str) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, reset_seconds=2.0, clock=clock)
    backend = contract_backend(redis_url, breaker=breaker)
    try:
        redis_server.stop()
        with pytest.raises(CacheUnavailable):
            await backend.get(KEY)
        clock.advance(2.0)
        with pytest.raises(CacheUnavailable) as trial:
            await backend.get(KEY)
        assert "circuit open" not in str(trial.value)  # the trial really went out, and failed
        assert breaker.state == "open"
        assert breaker.outages == 1  # still the same outage
        clock.advance(1.0)
        assert breaker.state == "open"  # a fresh period from the failed trial
        clock.advance(1.0)
        assert breaker.state == "half_open"
    finally:
        redis_server.start()
        await backend.aclose()


async def test_a_cancelled_trial_call_does_not_keep_the_circuit_open_forever(
    redis_server: RedisServer, redis_url: str
) -> None:
    """A request cancelled during the half-open trial (a client hanging up) decides nothing."""
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, reset_seconds=2.0, clock=clock)
    backend = contract_backend(redis_url, breaker=breaker)
    try:
        redis_server.stop()
        with pytest.raises(CacheUnavailable):
            await backend.get(KEY)
        redis_server.start()
        clock.advance(2.0)
        trial = asyncio.create_task(backend.get(KEY))
        await asyncio.sleep(0)  # the trial is admitted and waits on the network
        assert not trial.done()
        trial.cancel()
        with pytest.raises(asyncio.CancelledError):
            await trial
        assert await backend.get(KEY) is None  # the next call is the trial, and it succeeds
        assert breaker.state == "closed"
    finally:
        await backend.aclose()


def test_breaker_counts_only_consecutive_failures() -> None:
    breaker = CircuitBreaker(failure_threshold=3, clock=FakeClock())
    for _ in range(5):
        breaker.record_failure()
        breaker.record_failure()
        breaker.record_success()
    assert breaker.state == "closed"
    assert breaker.outages == 0


def test_breaker_admits_one_trial_at_a_time_when_half_open() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, reset_seconds=1.0, clock=clock)
    breaker.record_failure()
    assert not breaker.allow()
    clock.advance(1.0)
    assert breaker.allow()
    assert not breaker.allow()  # a second caller waits for the first trial's verdict
    assert breaker.record_success() is True
    assert breaker.allow() and breaker.allow()
    assert breaker.record_success() is False


async def _is_gone(backend: MemoryBackend | RedisBackend, key: str) -> bool:
    return await backend.get(key) is None


async def _holds(backend: MemoryBackend | RedisBackend, key: str, value: bytes) -> bool:
    return await backend.get(key) == value
