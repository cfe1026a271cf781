"""The memory-search cache: retrieval results keyed by user, memory generation, conversation and
normalized query.

The generation is the user's `memory_generation` column, which the database bumps in the same
transaction as any memory that is added, changed or deleted, and which the caller reads from the
database before each search. So a result cached before a change is unreachable the moment the change
commits, on every instance, whatever Redis did meanwhile (an outage, a restart with old data, a lost
message): a deleted memory can never come back from this cache. Old entries simply expire."""

from __future__ import annotations

import unicodedata
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

from companion.cache import keys
from companion.cache.backend import CacheBackend, CacheUnavailable
from companion.cache.stats import CacheStats
from companion.cache.tiered import Codec

T = TypeVar("T")


def normalize_query(query: str) -> str:
    """Case, spacing and Unicode form do not change what a search means."""
    return " ".join(unicodedata.normalize("NFKC", query).casefold().split())


class MemorySearchCache:
    def __init__(self, backend: CacheBackend, *, stats: CacheStats, ttl_seconds: float = 300) -> None:
        self._backend = backend
        self._stats = stats["memsearch"]
        self.ttl_seconds = ttl_seconds

    async def get_or_search(
        self,
        user_id: uuid.UUID,
        generation: int,
        conversation_id: uuid.UUID | None,
        query: str,
        search: Callable[[], Awaitable[T]],
        codec: Codec[T],
    ) -> T:
        """`generation`: the user's memory generation, read from the database before calling."""
        key = keys.memory_search(user_id, generation, conversation_id, normalize_query(query))
        try:
            data = await self._backend.get(key)
        except CacheUnavailable:
            self._stats.errors += 1
            return await search()
        if data is not None:
            self._stats.l2_hits += 1
            return codec.decode(data)
        self._stats.misses += 1
        result = await search()
        try:
            await self._backend.set(key, codec.encode(result), self.ttl_seconds)
        except CacheUnavailable:
            self._stats.errors += 1
        return result
