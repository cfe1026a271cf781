"""The memory-search cache: retrieval results keyed by user, conversation and normalized query,
under a per-user generation counter. Any new or deleted memory bumps the generation, so every
earlier result becomes unreachable at once (no TTL wait); old entries simply expire. A bump that
cannot reach Redis is replayed when it is back; until then this instance bypasses the cache."""

from __future__ import annotations

import logging
import unicodedata
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

from companion.cache import keys
from companion.cache.backend import CacheBackend, CacheUnavailable
from companion.cache.stats import CacheStats
from companion.cache.tiered import Codec

logger = logging.getLogger(__name__)
T = TypeVar("T")


def normalize_query(query: str) -> str:
    """Case, spacing and Unicode form do not change what a search means."""
    return " ".join(unicodedata.normalize("NFKC", query).casefold().split())


class MemorySearchCache:
    def __init__(self, backend: CacheBackend, *, stats: CacheStats, ttl_seconds: float = 300) -> None:
        self._backend = backend
        self._stats = stats["memsearch"]
        self.ttl_seconds = ttl_seconds
        self._pending_bumps: set[uuid.UUID] = set()

    async def get_or_search(
        self,
        user_id: uuid.UUID,
        conversation_id: uuid.UUID | None,
        query: str,
        search: Callable[[], Awaitable[T]],
        codec: Codec[T],
    ) -> T:
        if user_id in self._pending_bumps:
            await self._replay(user_id)
        if user_id in self._pending_bumps:
            self._stats.errors += 1
            return await search()
        try:
            generation = int(await self._backend.get(keys.memory_generation(user_id)) or 0)
            key = keys.memory_search(user_id, generation, conversation_id, normalize_query(query))
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

    async def memories_changed(self, user_id: uuid.UUID) -> None:
        """Call after any memory of the user is added, changed or deleted."""
        try:
            await self._backend.incr(keys.memory_generation(user_id))
        except CacheUnavailable:
            logger.warning("memory-search generation bump deferred until Redis is reachable")
            self._pending_bumps.add(user_id)

    async def _replay(self, user_id: uuid.UUID) -> None:
        try:
            await self._backend.incr(keys.memory_generation(user_id))
            self._pending_bumps.discard(user_id)
        except CacheUnavailable:
            pass
