"""The cache every domain uses: L1 (in-process) in front of a shared backend (Redis, or the memory
backend when Redis is off) in front of the database loader.

`get_or_load` does key-level single flight (100 concurrent misses on one instance run one loader),
takes a short loader lock in the shared backend (across instances at most one loader runs per key;
the others wait briefly for its value, then load without writing), and caches misses briefly. Any
backend failure is counted and skipped: the value comes from the loader and no request fails.

`invalidate` drops the key from L1, deletes it (and its loader lock) from the backend, and publishes
a small message so every other instance drops it from its L1. An invalidation that cannot reach
Redis is remembered and replayed when Redis is back, so nothing stale is served after an outage.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Generic, Protocol, TypeVar

import orjson

from companion.cache import keys
from companion.cache.backend import CacheBackend, CacheUnavailable
from companion.cache.codec import MISS_MARKER
from companion.cache.local import MISSING, LocalCache
from companion.cache.stats import CacheStats

logger = logging.getLogger(__name__)

T = TypeVar("T")
MAX_PENDING = 10_000


class Codec(Protocol[T]):  # type: ignore[misc]
    def encode(self, value: T) -> bytes: ...

    def decode(self, data: bytes) -> T: ...


class _Absent:
    """L1's record of a cached miss."""


ABSENT = _Absent()


class TieredCache:
    def __init__(
        self,
        backend: CacheBackend,
        *,
        local: LocalCache | None = None,
        stats: CacheStats | None = None,
        instance_id: str | None = None,
        lock_seconds: float = 5.0,
        wait_for_loader_seconds: float = 0.2,
        poll_seconds: float = 0.01,
    ) -> None:
        self.backend = backend
        self.local = local or LocalCache()
        self.stats = stats or CacheStats()
        self.instance_id = instance_id or uuid.uuid4().hex
        self.lock_seconds = lock_seconds
        self.wait_for_loader_seconds = wait_for_loader_seconds
        self.poll_seconds = poll_seconds
        self._inflight: dict[str, asyncio.Future[Any]] = {}
        self._pending: set[str] = set()
        self._pending_patterns: set[str] = set()
        self._flush_all_pending = False

    async def get_or_load(
        self,
        key: str,
        loader: Callable[[], Awaitable[T | None]],
        codec: Codec[T],
        *,
        ttl: float,
        local_ttl: float | None = None,
        miss_ttl: float | None = None,
    ) -> T | None:
        """The value for `key`, or None when the loader found nothing (cached for `miss_ttl`).

        Raises only what the loader raises (e.g. ServiceUnavailable when the database is down).
        """
        stats = self.stats[keys.namespace_of(key)]
        started = time.perf_counter()
        if local_ttl:
            value = self.local.get(key)
            if value is not MISSING:
                stats.l1_hits += 1
                stats.observe(time.perf_counter() - started)
                return None if value is ABSENT else value  # type: ignore[no-any-return]
        inflight = self._inflight.get(key)
        if inflight is not None:
            return await asyncio.shield(inflight)  # type: ignore[no-any-return]
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            result = await self._fetch(key, loader, codec, ttl, local_ttl, miss_ttl)
        except BaseException as error:
            if isinstance(error, Exception):
                future.set_exception(error)
                future.exception()  # mark retrieved: waiters (if any) still get it raised
            else:
                future.cancel()
            raise
        else:
            future.set_result(result)
        finally:
            del self._inflight[key]
            stats.observe(time.perf_counter() - started)
        return result

    async def _fetch(
        self,
        key: str,
        loader: Callable[[], Awaitable[T | None]],
        codec: Codec[T],
        ttl: float,
        local_ttl: float | None,
        miss_ttl: float | None,
    ) -> T | None:
        stats = self.stats[keys.namespace_of(key)]
        epoch = self.local.epoch(key)
        token: str | None = None
        backend_ok = True
        try:
            data = await self.backend.get(key)
            if data is None:
                token = uuid.uuid4().hex
                if not await self.backend.add(keys.lock(key), token.encode(), self.lock_seconds):
                    token = None
                    data = await self._wait_for_other_loader(key)
            if data is not None:
                stats.l2_hits += 1
                value = None if data == MISS_MARKER else codec.decode(data)
                self._remember(key, value, local_ttl, miss_ttl, epoch)
                return value
        except CacheUnavailable:
            stats.errors += 1
            backend_ok = False
            token = None
        stats.misses += 1
        stats.loads += 1
        try:
            value = await loader()
        except BaseException:
            if token is not None:
                await self._release(key, token)
            raise
        if backend_ok and token is not None:
            if value is None and not miss_ttl:
                await self._release(key, token)
            else:
                encoded = MISS_MARKER if value is None else codec.encode(value)
                try:
                    await self.backend.set_if_locked(
                        key, encoded, ttl if value is not None else miss_ttl or ttl, keys.lock(key), token
                    )
                except CacheUnavailable:
                    stats.errors += 1
        self._remember(key, value, local_ttl, miss_ttl, epoch)
        return value

    def _remember(
        self, key: str, value: Any, local_ttl: float | None, miss_ttl: float | None, epoch: tuple[int, int]
    ) -> None:
        if not local_ttl:
            return
        if value is None:
            if miss_ttl:
                self.local.put(key, ABSENT, min(local_ttl, miss_ttl), epoch)
            return
        self.local.put(key, value, local_ttl, epoch)

    async def _wait_for_other_loader(self, key: str) -> bytes | None:
        """Another instance holds the loader lock: poll briefly for its result."""
        deadline = time.monotonic() + self.wait_for_loader_seconds
        while time.monotonic() < deadline:
            await asyncio.sleep(self.poll_seconds)
            data = await self.backend.get(key)
            if data is not None:
                return data
        return None

    async def _release(self, key: str, token: str) -> None:
        try:
            lock_key = keys.lock(key)
            if await self.backend.get(lock_key) == token.encode():
                await self.backend.delete(lock_key)
        except CacheUnavailable:
            pass  # the lock expires by itself

    # --- invalidation ------------------------------------------------------------------------------

    async def invalidate(self, *cache_keys: str) -> None:
        """Drop keys everywhere: this L1, the shared backend, every other instance's L1."""
        for key in cache_keys:
            self.local.invalidate(key)
        try:
            await self.backend.delete(*cache_keys, *(keys.lock(k) for k in cache_keys))
            await self.backend.publish(
                keys.INVALIDATION_CHANNEL, orjson.dumps({"o": self.instance_id, "k": list(cache_keys)})
            )
        except CacheUnavailable:
            self._remember_pending(keys=cache_keys)

    async def invalidate_matching(self, pattern: str) -> int:
        """Drop every key matching a glob `pattern` (SCAN + UNLINK), and all L1s."""
        self.local.clear()
        try:
            removed = await self.backend.delete_matching(pattern)
            await self.backend.publish(keys.INVALIDATION_CHANNEL, orjson.dumps({"o": self.instance_id, "p": pattern}))
            return removed
        except CacheUnavailable:
            self._remember_pending(pattern=pattern)
            return 0

    def _remember_pending(self, *, keys: tuple[str, ...] = (), pattern: str | None = None) -> None:
        if pattern is not None:
            self._pending_patterns.add(pattern)
        self._pending.update(keys)
        if len(self._pending) + len(self._pending_patterns) > MAX_PENDING:
            self._pending.clear()
            self._pending_patterns.clear()
            self._flush_all_pending = True
        logger.warning("cache invalidation deferred until Redis is reachable (%d pending)", len(self._pending))

    @property
    def pending_invalidations(self) -> int:
        return len(self._pending) + len(self._pending_patterns) + (1 if self._flush_all_pending else 0)

    async def replay_pending(self) -> None:
        """Apply invalidations that could not reach Redis during an outage. Called on recovery."""
        if self._flush_all_pending:
            self._flush_all_pending = False
            for namespace in CACHED_NAMESPACES:
                self._pending_patterns.add(keys.namespace_pattern(namespace))
        patterns, self._pending_patterns = self._pending_patterns, set()
        pending, self._pending = self._pending, set()
        for pattern in patterns:
            await self.invalidate_matching(pattern)
        if pending:
            await self.invalidate(*pending)
        if patterns or pending:
            logger.info("replayed %d deferred cache invalidations", len(patterns) + len(pending))

    def on_message(self, message: bytes) -> None:
        """An invalidation published by some instance (ourselves included)."""
        try:
            payload = orjson.loads(message)
        except orjson.JSONDecodeError:
            logger.warning("ignoring a malformed invalidation message")
            return
        if payload.get("o") == self.instance_id:
            return
        if "p" in payload or payload.get("all"):
            self.local.clear()
        for key in payload.get("k", ()):
            self.local.invalidate(key)


CACHED_NAMESPACES = ("personality", "prefs", "apikey")


class Cached(Generic[T]):
    """A typed view on one namespace of the cache: TTLs and codec chosen once."""

    def __init__(
        self,
        cache: TieredCache,
        codec: Codec[T],
        *,
        ttl: float,
        local_ttl: float | None = None,
        miss_ttl: float | None = None,
    ) -> None:
        self.cache = cache
        self.codec = codec
        self.ttl = ttl
        self.local_ttl = local_ttl
        self.miss_ttl = miss_ttl

    async def get(self, key: str, loader: Callable[[], Awaitable[T | None]]) -> T | None:
        return await self.cache.get_or_load(
            key, loader, self.codec, ttl=self.ttl, local_ttl=self.local_ttl, miss_ttl=self.miss_ttl
        )
