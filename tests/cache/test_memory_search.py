"""The memory-search cache: results are reused until the user's memory generation (read from the
database) changes, queries that mean the same share an entry, and with Redis down, or back with old
data, searches go straight to the store or miss: a result from before a change is never served."""

from __future__ import annotations

import uuid

import pytest
from pydantic import BaseModel

from companion.cache import keys
from companion.cache.breaker import CircuitBreaker
from companion.cache.codec import ModelCodec
from companion.cache.memory_search import MemorySearchCache, normalize_query
from companion.cache.stats import CacheStats
from tests.cache.helpers import BackendCase, FakeClock
from tests.support.redis_server import RedisServer
from tests.support.redis_topologies import contract_backend

ALICE = uuid.UUID("00000000-0000-4000-8000-00000000a11c")
BOB = uuid.UUID("00000000-0000-4000-8000-000000000b0b")
CONVERSATION = uuid.UUID("00000000-0000-4000-8000-00000000c0c0")


class Results(BaseModel):
    memories: list[str]


CODEC = ModelCodec(Results)


class Store:
    """The memory store stand-in: what a search finds now, and how often it was searched."""

    def __init__(self, *memories: str) -> None:
        self.memories = list(memories)
        self.searches = 0

    async def search(self) -> Results:
        self.searches += 1
        return Results(memories=list(self.memories))


async def _search(
    cache: MemorySearchCache, store: Store, query: str = "what do I like?", *, generation: int = 0, **where: object
) -> Results:
    user = where.get("user", ALICE)
    conversation = where.get("conversation")
    return await cache.get_or_search(user, generation, conversation, query, store.search, CODEC)  # type: ignore[arg-type]


def _cache(case: BackendCase) -> MemorySearchCache:
    return MemorySearchCache(case.backend, stats=CacheStats())


async def test_a_cached_result_is_returned_without_searching_again(cache_backend: BackendCase) -> None:
    cache, store = _cache(cache_backend), Store("likes tea")
    assert await _search(cache, store) == Results(memories=["likes tea"])
    store.memories.append("likes cats")  # without a new generation: the cache cannot know
    assert await _search(cache, store) == Results(memories=["likes tea"])
    assert store.searches == 1


async def test_a_new_generation_makes_the_very_next_search_run_again(cache_backend: BackendCase) -> None:
    cache, store = _cache(cache_backend), Store("likes tea", "lives in Oslo")
    await _search(cache, store)
    await _search(cache, store, conversation=CONVERSATION)
    store.memories.remove("lives in Oslo")  # a memory deleted: the database bumps the generation
    assert await _search(cache, store, generation=1) == Results(memories=["likes tea"])
    assert await _search(cache, store, generation=1, conversation=CONVERSATION) == Results(memories=["likes tea"])
    assert store.searches == 4


async def test_one_users_generation_does_not_touch_other_users_results(cache_backend: BackendCase) -> None:
    cache, store = _cache(cache_backend), Store("x")
    await _search(cache, store, user=BOB)
    await _search(cache, store, user=ALICE, generation=5)
    await _search(cache, store, user=BOB)
    assert store.searches == 2


async def test_users_conversations_and_queries_have_separate_entries(cache_backend: BackendCase) -> None:
    cache, store = _cache(cache_backend), Store("x")
    await _search(cache, store)
    await _search(cache, store, user=BOB)
    await _search(cache, store, conversation=CONVERSATION)
    await _search(cache, store, "another question")
    assert store.searches == 4


async def test_queries_that_differ_only_in_case_space_or_unicode_form_share_an_entry(
    cache_backend: BackendCase,
) -> None:
    cache, store = _cache(cache_backend), Store("x")
    for query in (
        "Café au lait?",
        "  café   AU\tlait? ",
        "Cafe\u0301 au lait?",
        "\uff23\uff21\uff26\uff25\u0301 au lait?",
    ):
        await _search(cache, store, query)
    assert store.searches == 1


@pytest.mark.parametrize(
    ("query", "normalized"),
    [
        ("Hello World", "hello world"),
        ("  hello \t\n world  ", "hello world"),
        ("HELLO", "hello"),
        ("Straße", "strasse"),
        ("\uff28\uff25\uff2c\uff2c\uff2f", "hello"),  # fullwidth HELLO
        ("e\u0301", "\u00e9"),  # decomposed and composed é
        ("ﬁle", "file"),  # ligature
        ("", ""),
        (" \u00a0 ", ""),  # no-break space is space
    ],
)
def test_normalize_query_folds_case_spacing_and_unicode_form(query: str, normalized: str) -> None:
    assert normalize_query(query) == normalized


def test_normalize_query_keeps_meaningful_differences() -> None:
    assert normalize_query("tea") != normalize_query("coffee")
    assert normalize_query("a b") != normalize_query("ab")


async def test_results_expire_after_the_ttl(cache_backend: BackendCase) -> None:
    cache = MemorySearchCache(cache_backend.backend, stats=CacheStats(), ttl_seconds=cache_backend.short_ttl)
    store = Store("x")
    await _search(cache, store)
    key = keys.memory_search(ALICE, 0, None, normalize_query("what do I like?"))

    async def expired() -> bool:
        return await cache_backend.backend.get(key) is None

    await cache_backend.after_ttl(expired, key=key)
    await _search(cache, store)
    assert store.searches == 2


async def test_hits_and_misses_are_counted(cache_backend: BackendCase) -> None:
    stats = CacheStats()
    cache, store = MemorySearchCache(cache_backend.backend, stats=stats), Store("x")
    await _search(cache, store)
    await _search(cache, store)
    assert (stats["memsearch"].misses, stats["memsearch"].l2_hits) == (1, 1)


# --- Redis down ------------------------------------------------------------------------------------


def _redis_cache(url: str, **breaker: object) -> MemorySearchCache:
    options: dict[str, object] = {"clock": FakeClock(), **breaker}
    backend = contract_backend(url, breaker=CircuitBreaker(**options))  # type: ignore[arg-type]
    return MemorySearchCache(backend, stats=CacheStats())


async def test_with_redis_down_searches_run_directly(redis_server: RedisServer, redis_url: str) -> None:
    cache, store = _redis_cache(redis_url), Store("likes tea")
    try:
        redis_server.stop()
        for _ in range(5):
            assert await _search(cache, store) == Results(memories=["likes tea"])
        assert store.searches == 5
        assert cache._stats.errors >= 5
    finally:
        await cache._backend.aclose()


async def test_redis_back_with_old_results_never_serves_a_deleted_memory(
    redis_server: RedisServer, redis_url: str
) -> None:
    """A memory deleted during an outage must never come back from the cache afterwards, even when
    Redis restarts with the results it held before: the generation comes from the database."""
    clock = FakeClock()
    cache = _redis_cache(redis_url, failure_threshold=1, reset_seconds=2.0, clock=clock)
    store = Store("likes tea", "secret I asked you to forget")
    try:
        assert "secret I asked you to forget" in (await _search(cache, store)).memories
        redis_server.stop(keep_data=True)  # Redis comes back with the old results in it
        store.memories.remove("secret I asked you to forget")  # deleted: generation 0 -> 1
        assert await _search(cache, store, generation=1) == Results(memories=["likes tea"])
        redis_server.start()
        clock.advance(2.0)
        assert await _search(cache, store, generation=1) == Results(memories=["likes tea"])
        assert await _search(cache, store, generation=1) == Results(memories=["likes tea"])
        assert store.searches == 3  # cached again under the new generation
    finally:
        await cache._backend.aclose()


async def test_redis_dying_during_a_search_still_returns_its_result(redis_server: RedisServer, redis_url: str) -> None:
    cache = _redis_cache(redis_url)
    store = Store("likes tea")

    async def search_while_redis_dies() -> Results:
        redis_server.stop()
        return await store.search()

    try:
        found = await cache.get_or_search(ALICE, 0, None, "q", search_while_redis_dies, CODEC)
        assert found == Results(memories=["likes tea"])
    finally:
        await cache._backend.aclose()
