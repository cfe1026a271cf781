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
from collections.abc import Awaitable, Callable, Collection
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


class Codec(Protocol[T]):
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
        # `is None`, not `or`: an empty LocalCache is falsy (it has __len__), and the one passed in
        # (its size bound, its clock) must be the one used.
        self.local = local if local is not None else LocalCache()
        self.stats = stats if stats is not None else CacheStats()
        self.instance_id = instance_id or uuid.uuid4().hex
        self.lock_seconds = lock_seconds
        self.wait_for_loader_seconds = wait_for_loader_seconds
        self.poll_seconds = poll_seconds
        self._inflight: dict[str, asyncio.Future[Any]] = {}
        self._pending: set[str] = set()
        self._pending_patterns: set[str] = set()
        self._flush_all_pending = False
        self._replaying = asyncio.Lock()  # one replay at a time: it may SCAN the whole keyspace
        self._replayer: asyncio.Task[Any] | None = None

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
                return None if value is ABSENT else value
        inflight = self._inflight.get(key)
        if inflight is not None:
            try:
                return await asyncio.shield(inflight)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not inflight.cancelled() or (task is not None and task.cancelling()):
                    raise
            # The caller whose load we joined was cancelled (e.g. its client hung up), not us.
            return await self.get_or_load(key, loader, codec, ttl=ttl, local_ttl=local_ttl, miss_ttl=miss_ttl)
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
            if self._inflight.get(key) is future:  # an invalidation may have detached it already
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
        if self.pending_invalidations:
            # Redis may be back: apply what could not reach it first, or this very read could
            # return a value whose invalidation is still waiting here.
            await self.replay_pending()
        epoch = self.local.epoch(key)
        token: str | None = None
        backend_ok = True
        try:
            if self.pending_invalidations:
                # Still not applied (Redis unreachable, or back only just now): what it holds may be
                # exactly what they are meant to remove, so neither read it nor write to it.
                raise CacheUnavailable("invalidations pending")
            data = await self.backend.get(key)
            if data is None:
                token = uuid.uuid4().hex
                if await self.backend.add(keys.lock(key), token.encode(), self.lock_seconds):
                    # Another instance's load may have finished (and released the lock) between
                    # our read and our lock: then its value is there, and loading again is waste.
                    data = await self.backend.get(key)
                    if data is not None:
                        await self._release(key, token)
                        token = None
                else:
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
            # A load that began before this write may have read the old value: later callers must
            # not join it.
            self._inflight.pop(key, None)
        try:
            await self._drop(cache_keys)
        except CacheUnavailable:
            self._remember_pending(keys=cache_keys)

    async def _drop(self, cache_keys: Collection[str]) -> None:
        await self.backend.delete(*cache_keys, *(keys.lock(k) for k in cache_keys))
        await self.backend.publish(
            keys.INVALIDATION_CHANNEL, orjson.dumps({"o": self.instance_id, "k": list(cache_keys)})
        )

    async def invalidate_matching(self, pattern: str) -> int:
        """Drop every key matching a glob `pattern` (SCAN + UNLINK), and all L1s."""
        self.local.clear()
        self._inflight.clear()
        try:
            return await self._drop_matching(pattern)
        except CacheUnavailable:
            self._remember_pending(pattern=pattern)
            return 0

    async def _drop_matching(self, pattern: str) -> int:
        removed = await self.backend.delete_matching(pattern)
        if not pattern.endswith("*"):
            # `<key>:lock` matches a trailing `*` but not an exact pattern. A loader whose lock
            # survived could write back what it read before this change.
            await self.backend.delete_matching(keys.lock(pattern))
        await self.backend.publish(keys.INVALIDATION_CHANNEL, orjson.dumps({"o": self.instance_id, "p": pattern}))
        return removed

    def _remember_pending(self, *, keys: tuple[str, ...] = (), pattern: str | None = None) -> None:
        if pattern is not None:
            self._pending_patterns.add(pattern)
        self._pending.update(keys)
        if len(self._pending) + len(self._pending_patterns) > MAX_PENDING:
            self._pending.clear()
            self._pending_patterns.clear()
            self._flush_all_pending = True
        logger.warning("cache invalidation deferred until Redis is reachable (%d pending)", len(self._pending))

    def distrust_backend(self) -> None:
        """Invalidations may have been missed: this instance lost the invalidation channel, so Redis
        was unreachable or restarted, and another instance's deletes may not have reached it (they
        are pending there, or lost if it stopped meanwhile), while a Redis with persistence comes
        back with the entries they were meant to remove. So before this instance reads the backend
        again, every cached namespace there is dropped (see `replay_pending`)."""
        self._flush_all_pending = True

    @property
    def pending_invalidations(self) -> int:
        return len(self._pending) + len(self._pending_patterns) + (1 if self._flush_all_pending else 0)

    async def replay_pending(self) -> None:
        """Apply invalidations that could not reach Redis during an outage. Called on recovery and
        before any read while some are pending. Each stays pending until it has been applied, so
        a concurrent read cannot slip in between "taken off the list" and "deleted in Redis"."""
        if not self.pending_invalidations or self._replayer is asyncio.current_task():
            return  # nothing to do, or called back from within our own replay (a recovery callback)
        async with self._replaying:
            self._replayer = asyncio.current_task()
            try:
                await self._replay_pending()
            finally:
                self._replayer = None

    async def _replay_pending(self) -> None:
        if self._flush_all_pending:
            self._flush_all_pending = False
            for namespace in CACHED_NAMESPACES:
                self._pending_patterns.add(keys.namespace_pattern(namespace))
        replayed = 0
        try:
            for pattern in list(self._pending_patterns):
                await self._drop_matching(pattern)
                self._pending_patterns.discard(pattern)
                replayed += 1
            if self._pending:
                pending = list(self._pending)
                await self._drop(pending)
                self._pending.difference_update(pending)
                replayed += len(pending)
        except CacheUnavailable:
            pass  # still unreachable: they stay pending for the next try
        if replayed:
            logger.info("replayed %d deferred cache invalidations", replayed)

    def on_message(self, message: bytes) -> None:
        """An invalidation published by some instance (ourselves included)."""
        try:
            payload = orjson.loads(message)
        except orjson.JSONDecodeError:
            payload = None
        cache_keys = payload.get("k", []) if isinstance(payload, dict) else None
        if not isinstance(cache_keys, list):
            # Raising here would take the listener (and so every L1) down over one bad message.
            logger.warning("ignoring a malformed invalidation message")
            return
        if payload.get("o") == self.instance_id:
            return
        if "p" in payload or payload.get("all"):
            self.local.clear()
            self._inflight.clear()
        for key in cache_keys:
            if isinstance(key, str):
                self.local.invalidate(key)
                self._inflight.pop(key, None)


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
