"""TieredCache against both backends: single flight on one instance and across instances, L1 hits,
cached misses, invalidation (and the stale-write race it guards against), and what happens while
Redis is down: values still come from the loader, invalidations wait and are replayed."""

from __future__ import annotations

import asyncio
import uuid

import orjson
import pytest

from companion.cache import keys
from companion.cache.breaker import CircuitBreaker
from companion.cache.codec import MISS_MARKER
from companion.cache.local import LocalCache
from companion.cache.tiered import MAX_PENDING, Cached, TieredCache
from tests.cache.helpers import BackendCase, FakeClock, Item, ItemCodec, Loader, RecordingBackend
from tests.support.live import wait_for
from tests.support.redis_server import RedisServer
from tests.support.redis_topologies import contract_backend

USER = uuid.UUID("00000000-0000-4000-8000-0000000000aa")
KEY = keys.personality(USER, "friendly")
CODEC = ItemCodec()
OLD, NEW = Item(name="friendly", version=1), Item(name="friendly", version=2)


def make_cache(case: BackendCase, backend: object | None = None, **options: object) -> TieredCache:
    """A TieredCache whose L1 runs on the memory backend's clock (or its own fake one)."""
    local = LocalCache(clock=case.clock or FakeClock())
    return TieredCache(backend or case.backend, local=local, **options)  # type: ignore[arg-type]


async def get(
    cache: TieredCache,
    loader: Loader,
    key: str = KEY,
    *,
    local_ttl: float | None = 30,
    miss_ttl: float | None = 10,
) -> Item | None:
    return await cache.get_or_load(key, loader, CODEC, ttl=60, local_ttl=local_ttl, miss_ttl=miss_ttl)


# --- single flight -----------------------------------------------------------------------------------


async def test_100_concurrent_misses_on_one_instance_run_the_loader_once(cache_backend: BackendCase) -> None:
    cache = make_cache(cache_backend)
    loader = Loader(OLD, gated=True)
    tasks = [asyncio.create_task(get(cache, loader)) for _ in range(100)]
    await wait_for(loader.started.is_set, what="the loader to start")
    loader.gate.set()
    assert await asyncio.gather(*tasks) == [OLD] * 100
    assert loader.calls == 1
    stats = cache.stats["personality"]
    assert (stats.loads, stats.l1_hits) == (1, 0)  # all 100 were misses, and one loaded


async def test_concurrent_misses_on_two_instances_run_the_loader_at_most_once(cache_backend: BackendCase) -> None:
    first, second = RecordingBackend(cache_backend.backend), RecordingBackend(cache_backend.backend)
    a = make_cache(cache_backend, first)
    b = make_cache(cache_backend, second, wait_for_loader_seconds=10)
    loader = Loader(OLD, gated=True)
    lock_refused = asyncio.Event()

    async def after_add(_args: tuple[object, ...], taken: object) -> None:
        if not taken:
            lock_refused.set()

    first.after["add"] = second.after["add"] = after_add
    tasks = [asyncio.create_task(get(cache, loader)) for _ in range(50) for cache in (a, b)]
    # One instance loads (its loader waits at the gate), the other found the lock taken.
    await wait_for(lambda: loader.started.is_set() and lock_refused.is_set(), what="both instances to miss")
    loader.gate.set()
    assert await asyncio.gather(*tasks) == [OLD] * 100
    assert loader.calls == 1
    assert a.stats["personality"].loads + b.stats["personality"].loads == 1


async def test_a_load_finishing_between_another_instances_read_and_lock_is_not_repeated(
    cache_backend: BackendCase,
) -> None:
    """B misses; before B asks for the loader lock, A's load completes and releases it. B must
    use A's value rather than load again."""
    a = make_cache(cache_backend)
    recording = RecordingBackend(cache_backend.backend)
    b = make_cache(cache_backend, recording)
    loader = Loader(OLD, gated=True)
    a_task = asyncio.create_task(get(a, loader))
    await wait_for(loader.started.is_set, what="A's loader to start")

    async def after_get(args: tuple[object, ...], found: object) -> None:
        if args[0] == KEY and found is None and not a_task.done():
            loader.gate.set()
            await a_task

    recording.after["get"] = after_get
    assert await get(b, loader) == OLD
    assert loader.calls == 1


async def test_a_loader_error_reaches_every_waiter_and_releases_the_lock(cache_backend: BackendCase) -> None:
    cache = make_cache(cache_backend)
    loader = Loader(OLD, gated=True, error=RuntimeError("database down"))
    tasks = [asyncio.create_task(get(cache, loader)) for _ in range(10)]
    await wait_for(loader.started.is_set, what="the loader to start")
    loader.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(result, RuntimeError) for result in results)
    assert loader.calls == 1
    assert await cache_backend.backend.get(keys.lock(KEY)) is None
    loader.error = None
    assert await get(cache, loader) == OLD  # nothing failed was cached


async def test_cancelling_the_first_caller_does_not_fail_the_callers_waiting_for_its_load(
    cache_backend: BackendCase,
) -> None:
    cache = make_cache(cache_backend)
    loader = Loader(OLD, gated=True)
    leader = asyncio.create_task(get(cache, loader))
    await wait_for(loader.started.is_set, what="the loader to start")
    waiters = [asyncio.create_task(get(cache, loader)) for _ in range(5)]
    await asyncio.sleep(0)  # the waiters join the leader's load
    leader.cancel()  # e.g. its client hung up
    with pytest.raises(asyncio.CancelledError):
        await leader
    loader.gate.set()
    assert await asyncio.gather(*waiters) == [OLD] * 5


# --- tiers ---------------------------------------------------------------------------------------------


async def test_an_l1_hit_returns_without_touching_the_backend(cache_backend: BackendCase) -> None:
    recording = RecordingBackend(cache_backend.backend)
    cache = make_cache(cache_backend, recording)
    loader = Loader(OLD)
    assert await get(cache, loader) == OLD
    calls = recording.count()
    if cache_backend.server is not None:
        cache_backend.server.stop()  # an L1 hit does not even notice
    loader.value = NEW
    assert cache.local.enabled
    assert await get(cache, loader) == OLD
    assert recording.count() == calls
    assert loader.calls == 1
    assert cache.stats["personality"].l1_hits == 1


async def test_an_l2_hit_fills_l1_without_loading(cache_backend: BackendCase) -> None:
    writer, reader = make_cache(cache_backend), make_cache(cache_backend)
    loader = Loader(OLD)
    await get(writer, loader)
    assert await get(reader, loader) == OLD
    assert await get(reader, loader) == OLD
    assert loader.calls == 1
    assert (reader.stats["personality"].l2_hits, reader.stats["personality"].l1_hits) == (1, 1)


async def test_without_local_ttl_every_read_goes_to_the_backend(cache_backend: BackendCase) -> None:
    recording = RecordingBackend(cache_backend.backend)
    cache = make_cache(cache_backend, recording)
    loader = Loader(OLD)
    for _ in range(3):
        assert await get(cache, loader, local_ttl=None) == OLD
    assert loader.calls == 1
    assert recording.count("get") >= 3
    assert len(cache.local) == 0


async def test_l1_entries_expire_after_local_ttl(cache_backend: BackendCase) -> None:
    clock = FakeClock()
    cache = TieredCache(cache_backend.backend, local=LocalCache(clock=clock))
    loader = Loader(OLD)
    await get(cache, loader, local_ttl=30)
    clock.advance(31)
    await get(cache, loader, local_ttl=30)
    assert cache.stats["personality"].l2_hits == 1  # past its L1 TTL, read again from L2


# --- misses ------------------------------------------------------------------------------------------


async def test_a_miss_is_cached_for_miss_ttl_then_loaded_again(cache_backend: BackendCase) -> None:
    clock = cache_backend.clock or FakeClock()  # L1's clock (and the memory backend's)
    cache = TieredCache(cache_backend.backend, local=LocalCache(clock=clock))
    other = TieredCache(cache_backend.backend, local=LocalCache(clock=clock))  # sees only L2
    miss_ttl = cache_backend.short_ttl
    loader = Loader(None)
    assert await get(cache, loader, miss_ttl=miss_ttl) is None
    assert await get(cache, loader, miss_ttl=miss_ttl) is None  # L1
    assert await get(other, loader, miss_ttl=miss_ttl) is None  # L2
    assert loader.calls == 1
    assert await cache_backend.backend.get(KEY) == MISS_MARKER
    if cache_backend.redis is not None:
        assert 0 < await cache_backend.redis.pttl(KEY) <= miss_ttl * 1000

    async def miss_expired_in_l2() -> bool:
        return await cache_backend.backend.get(KEY) is None

    clock.advance(miss_ttl + 0.001)  # L1
    await cache_backend.after_ttl(miss_expired_in_l2, key=KEY)
    loader.value = OLD  # created meanwhile
    assert await get(cache, loader, miss_ttl=miss_ttl) == OLD
    assert loader.calls == 2


async def test_invalidate_makes_the_next_get_reload_a_cached_miss(cache_backend: BackendCase) -> None:
    cache = make_cache(cache_backend)
    loader = Loader(None)
    assert await get(cache, loader) is None
    loader.value = OLD  # created
    await cache.invalidate(KEY)
    assert await get(cache, loader) == OLD
    assert loader.calls == 2


async def test_without_miss_ttl_a_miss_is_not_cached_and_leaves_no_lock(cache_backend: BackendCase) -> None:
    cache = make_cache(cache_backend)
    loader = Loader(None)
    assert await get(cache, loader, miss_ttl=None) is None
    assert await get(cache, loader, miss_ttl=None) is None
    assert loader.calls == 2
    assert await cache_backend.backend.mget([KEY, keys.lock(KEY)]) == [None, None]


# --- invalidation ------------------------------------------------------------------------------------


async def test_invalidate_makes_the_next_get_reload(cache_backend: BackendCase) -> None:
    cache = make_cache(cache_backend)
    loader = Loader(OLD)
    await get(cache, loader)
    loader.value = NEW
    await cache.invalidate(KEY)
    assert await cache_backend.backend.get(KEY) is None
    assert await get(cache, loader) == NEW
    assert CODEC.decode(await cache_backend.backend.get(KEY) or b"") == NEW


async def test_invalidate_tells_other_instances(cache_backend: BackendCase) -> None:
    cache = make_cache(cache_backend, instance_id="writer")
    messages = []
    if cache_backend.redis is not None:
        pubsub = cache_backend.redis.pubsub()
        await pubsub.subscribe(keys.INVALIDATION_CHANNEL)
        assert (await pubsub.get_message(timeout=2.0) or {}).get("type") == "subscribe"
        await cache.invalidate(KEY)
        message = await pubsub.get_message(timeout=2.0)
        await pubsub.aclose()
        assert message is not None
        messages.append(message["data"])
    else:
        await cache.invalidate(KEY)
        messages = [data for _, data in cache_backend.backend.published]  # type: ignore[union-attr]
    assert [orjson.loads(data) for data in messages] == [{"o": "writer", "k": [KEY]}]


async def test_a_loader_that_read_before_an_invalidation_leaves_nothing_stale_in_l1_or_l2(
    cache_backend: BackendCase,
) -> None:
    cache = make_cache(cache_backend)
    loader = Loader(OLD, gated=True)
    first = asyncio.create_task(get(cache, loader))
    await wait_for(loader.started.is_set, what="the loader to read")
    loader.value = NEW  # a writer commits...
    await cache.invalidate(KEY)  # ...then invalidates, while the old read is still in flight
    loader.gate.set()
    assert await first == OLD  # it began before the write: old is a fair answer for it
    assert await cache_backend.backend.get(KEY) is None  # but it did not go into L2
    assert await get(cache, loader) == NEW  # nor into L1
    assert loader.calls == 2


async def test_a_get_that_starts_after_an_invalidation_does_not_join_an_older_load(
    cache_backend: BackendCase,
) -> None:
    """Read-your-writes: a request after a completed write must not get what a load that began
    before the write read."""
    cache = make_cache(cache_backend)
    loader = Loader(OLD, gated=True)
    first = asyncio.create_task(get(cache, loader))
    await wait_for(loader.started.is_set, what="the loader to read")
    loader.value = NEW
    await cache.invalidate(KEY)
    second = asyncio.create_task(get(cache, loader))
    await asyncio.sleep(0)
    loader.gate.set()
    assert await first == OLD
    assert await second == NEW


async def test_invalidate_matching_drops_entries_and_keeps_a_stale_load_out(cache_backend: BackendCase) -> None:
    """An operator's edit of a global personality: every user's entry for the name goes, and a load
    that read the old version meanwhile cannot write it back."""
    cache = make_cache(cache_backend)
    users = [uuid.UUID(int=n) for n in range(1, 4)]
    loader = Loader(OLD)
    for user in users:
        await get(cache, loader, keys.personality(user, "friendly"))
    await get(cache, loader, keys.personality(users[0], "other"))
    slow = Loader(OLD, gated=True)
    in_flight = asyncio.create_task(get(cache, slow, keys.personality(uuid.UUID(int=99), "friendly")))
    await wait_for(slow.started.is_set, what="the loader to read")

    assert await cache.invalidate_matching(keys.personality_pattern("friendly")) == 3
    slow.gate.set()
    assert await in_flight == OLD
    assert await cache_backend.backend.get(keys.personality(uuid.UUID(int=99), "friendly")) is None
    assert await cache_backend.backend.get(keys.personality(users[0], "other")) is not None
    loader.value = NEW
    assert await get(cache, loader, keys.personality(users[1], "friendly")) == NEW


@pytest.mark.parametrize(
    "message",
    [
        b"not json",
        b"",
        b"[1, 2]",
        b"42",
        b'"a string"',
        b"null",
        b'{"o": "other", "k": 5}',
        b'{"o": "other", "k": [1, null]}',
        b'{"o": ["other"], "k": []}',
    ],
)
async def test_a_malformed_invalidation_message_is_ignored(cache_backend: BackendCase, message: bytes) -> None:
    cache = make_cache(cache_backend)
    await get(cache, Loader(OLD))
    cache.on_message(message)  # must not raise: it would take the listener down
    assert await get(cache, Loader(NEW)) == OLD


async def test_an_invalidation_from_another_instance_drops_the_keys_from_l1(cache_backend: BackendCase) -> None:
    cache = make_cache(cache_backend, instance_id="me")
    other_key = keys.preferences(USER)
    await get(cache, Loader(OLD))
    await get(cache, Loader(OLD), other_key)
    cache.on_message(orjson.dumps({"o": "someone-else", "k": [KEY]}))
    assert cache.local.get(KEY) is not OLD
    assert cache.local.get(other_key) == OLD


async def test_a_pattern_invalidation_from_another_instance_clears_l1(cache_backend: BackendCase) -> None:
    cache = make_cache(cache_backend, instance_id="me")
    await get(cache, Loader(OLD))
    await get(cache, Loader(OLD), keys.preferences(USER))
    cache.on_message(orjson.dumps({"o": "someone-else", "p": keys.personality_pattern("friendly")}))
    assert len(cache.local) == 0


async def test_an_instance_ignores_its_own_invalidation_messages(cache_backend: BackendCase) -> None:
    cache = make_cache(cache_backend, instance_id="me")
    await get(cache, Loader(OLD))
    cache.on_message(orjson.dumps({"o": "me", "k": [KEY]}))
    cache.on_message(orjson.dumps({"o": "me", "p": keys.personality_pattern()}))
    assert cache.local.get(KEY) == OLD


async def test_an_invalidation_message_also_stops_a_local_load_that_began_before_it(
    cache_backend: BackendCase,
) -> None:
    cache = make_cache(cache_backend, instance_id="me")
    loader = Loader(OLD, gated=True)
    first = asyncio.create_task(get(cache, loader))
    await wait_for(loader.started.is_set, what="the loader to read")
    loader.value = NEW
    await cache_backend.backend.delete(KEY, keys.lock(KEY))  # another instance's write...
    cache.on_message(orjson.dumps({"o": "writer", "k": [KEY]}))  # ...and its invalidation
    second = asyncio.create_task(get(cache, loader))
    await asyncio.sleep(0)
    loader.gate.set()
    assert await first == OLD
    assert await second == NEW
    assert cache.local.get(KEY) == NEW


# --- Redis down ------------------------------------------------------------------------------------


def redis_cache(url: str, clock: FakeClock | None = None, *, failures: int = 3) -> TieredCache:
    breaker = CircuitBreaker(failure_threshold=failures, reset_seconds=2.0, clock=clock or FakeClock())
    return TieredCache(contract_backend(url, breaker=breaker), local=LocalCache(clock=FakeClock()))


async def test_with_redis_down_get_or_load_returns_the_loaders_value_and_counts_an_error(
    redis_server: RedisServer, redis_url: str
) -> None:
    cache = redis_cache(redis_url)
    try:
        redis_server.stop()
        loader = Loader(OLD)
        assert await get(cache, loader) == OLD
        assert await get(cache, loader, keys.preferences(USER)) == OLD
        assert cache.stats["personality"].errors == 1
        assert cache.stats["prefs"].errors == 1
        assert loader.calls == 2
    finally:
        await cache.backend.aclose()


async def test_with_the_circuit_open_get_or_load_does_not_wait_for_redis(
    redis_server: RedisServer, redis_url: str
) -> None:
    cache = redis_cache(redis_url, failures=1)
    try:
        redis_server.stop()
        loader = Loader(OLD)
        for index in range(20):
            assert await get(cache, loader, keys.personality(USER, f"p{index}")) == OLD
        assert cache.backend.breaker.state == "open"  # type: ignore[attr-defined]
        assert cache.stats["personality"].errors == 20
    finally:
        await cache.backend.aclose()


async def test_an_invalidation_while_redis_is_down_is_deferred_and_replayed_after_restart(
    redis_server: RedisServer, redis_url: str
) -> None:
    cache = redis_cache(redis_url)
    try:
        loader = Loader(OLD)
        await get(cache, loader, local_ttl=None)
        redis_server.stop(keep_data=True)
        loader.value = NEW
        await cache.invalidate(KEY)
        assert cache.pending_invalidations == 1
        redis_server.start()  # with the old value still in it
        assert await cache.backend.get(KEY) is not None
        await cache.replay_pending()
        assert cache.pending_invalidations == 0
        assert await cache.backend.get(KEY) is None
        assert await get(cache, loader, local_ttl=None) == NEW
    finally:
        await cache.backend.aclose()


@pytest.mark.parametrize("failures", [1, 3], ids=["circuit-opened", "circuit-stayed-closed"])
async def test_the_first_read_after_redis_is_back_never_serves_a_value_whose_invalidation_is_pending(
    redis_server: RedisServer, redis_url: str, failures: int
) -> None:
    clock = FakeClock()
    cache = redis_cache(redis_url, clock, failures=failures)
    cache.backend.on_recovery.append(cache.replay_pending)  # type: ignore[attr-defined]  # as services.py does
    try:
        loader = Loader(OLD)
        await get(cache, loader, local_ttl=None)
        redis_server.stop(keep_data=True)
        loader.value = NEW
        await cache.invalidate(KEY)
        redis_server.start()
        clock.advance(2.0)  # past the breaker's reset, if it opened
        assert await get(cache, loader, local_ttl=None) == NEW
        assert cache.pending_invalidations == 0
    finally:
        await cache.backend.aclose()


async def test_a_deferred_invalidation_is_replayed_as_soon_as_redis_answers_even_if_the_circuit_never_opened(
    redis_server: RedisServer, redis_url: str
) -> None:
    cache = redis_cache(redis_url, failures=3)
    backend = cache.backend
    backend.on_recovery.append(cache.replay_pending)  # type: ignore[attr-defined]
    try:
        await get(cache, Loader(OLD), local_ttl=None)
        redis_server.stop(keep_data=True)
        await cache.invalidate(KEY)  # one failure: below the threshold, the circuit stays closed
        redis_server.start()
        await backend.ping()  # any call that reaches Redis again
        assert cache.pending_invalidations == 0
        assert await backend.get(KEY) is None  # other instances no longer read the stale value
    finally:
        await backend.aclose()


async def test_overflowing_deferred_invalidations_drop_whole_cached_namespaces_but_never_sessions(
    redis_server: RedisServer, redis_url: str
) -> None:
    clock = FakeClock()
    cache = redis_cache(redis_url, clock, failures=1)
    backend = cache.backend
    try:
        cached = [keys.personality(USER, "a"), keys.preferences(USER), keys.api_key("k")]
        durable = [keys.session(USER, "s1"), keys.session_index(USER), keys.token_quota(USER, "daily", "2026-11-28")]
        for key in cached + durable:
            await backend.set(key, b"1")
        redis_server.stop(keep_data=True)
        for index in range(MAX_PENDING + 1):
            await cache.invalidate(keys.personality(USER, f"p{index}"))
        assert cache.pending_invalidations == 1  # "drop everything cached" instead of 10,001 keys
        redis_server.start()
        clock.advance(2.0)
        await cache.replay_pending()
        assert cache.pending_invalidations == 0
        assert await backend.mget(cached) == [None, None, None]
        assert await backend.mget(durable) == [b"1", b"1", b"1"]
    finally:
        await backend.aclose()


async def test_invalidate_while_redis_is_down_still_drops_the_key_from_this_l1(
    redis_server: RedisServer, redis_url: str
) -> None:
    cache = redis_cache(redis_url)
    try:
        loader = Loader(OLD)
        await get(cache, loader)
        redis_server.stop()
        loader.value = NEW
        await cache.invalidate(KEY)
        assert await get(cache, loader) == NEW
    finally:
        await cache.backend.aclose()


async def test_replay_with_redis_still_down_keeps_the_invalidations_pending(
    redis_server: RedisServer, redis_url: str
) -> None:
    cache = redis_cache(redis_url)
    try:
        redis_server.stop()
        await cache.invalidate(KEY)
        await cache.invalidate_matching(keys.personality_pattern("x"))
        assert cache.pending_invalidations == 2
        await cache.replay_pending()
        assert cache.pending_invalidations == 2
    finally:
        await cache.backend.aclose()


async def test_cancelling_one_waiter_leaves_the_load_and_the_other_waiters_alone(cache_backend: BackendCase) -> None:
    cache = make_cache(cache_backend)
    loader = Loader(OLD, gated=True)
    leader = asyncio.create_task(get(cache, loader))
    await wait_for(loader.started.is_set, what="the loader to start")
    quitter, stayer = asyncio.create_task(get(cache, loader)), asyncio.create_task(get(cache, loader))
    await asyncio.sleep(0)
    quitter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await quitter
    loader.gate.set()
    assert await leader == OLD
    assert await stayer == OLD
    assert loader.calls == 1


async def test_a_lock_held_by_an_instance_that_never_finishes_delays_a_load_only_briefly(
    cache_backend: BackendCase,
) -> None:
    """The other loader (say, a crashed instance) never writes: after waiting briefly, load without
    writing, and leave its lock alone."""
    cache = make_cache(cache_backend, wait_for_loader_seconds=0.05, poll_seconds=0.005)
    await cache_backend.backend.add(keys.lock(KEY), b"someone-else", 60)
    loader = Loader(OLD)
    assert await get(cache, loader) == OLD
    assert loader.calls == 1
    assert await cache_backend.backend.get(KEY) is None
    assert await cache_backend.backend.get(keys.lock(KEY)) == b"someone-else"


async def test_cached_view_applies_its_ttls_and_codec(cache_backend: BackendCase) -> None:
    cache = make_cache(cache_backend)
    view = Cached(cache, CODEC, ttl=60, local_ttl=30, miss_ttl=10)
    loader = Loader(None)
    assert await view.get(KEY, loader) is None
    assert await view.get(KEY, loader) is None  # the miss is cached
    assert loader.calls == 1
    assert await cache_backend.backend.get(KEY) == MISS_MARKER


async def test_redis_dying_during_a_load_still_returns_the_loaded_value(
    redis_server: RedisServer, redis_url: str
) -> None:
    cache = redis_cache(redis_url)
    try:
        loader = Loader(OLD, gated=True)
        task = asyncio.create_task(get(cache, loader))
        await wait_for(loader.started.is_set, what="the loader to start")
        redis_server.stop()
        loader.gate.set()
        assert await task == OLD  # the write-back failed, quietly
        assert cache.stats["personality"].errors == 1
    finally:
        await cache.backend.aclose()


async def test_a_loader_error_with_redis_down_is_the_loaders_error(redis_server: RedisServer, redis_url: str) -> None:
    cache = redis_cache(redis_url)
    try:
        loader = Loader(OLD, gated=True, error=RuntimeError("database down"))
        task = asyncio.create_task(get(cache, loader))
        await wait_for(loader.started.is_set, what="the loader to start")
        redis_server.stop()  # the lock cannot be released now; it expires by itself
        loader.gate.set()
        with pytest.raises(RuntimeError, match="database down"):
            await task
    finally:
        await cache.backend.aclose()
