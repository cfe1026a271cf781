"""The in-process cache backend used when REDIS_ENABLED=false: the same bytes Redis would hold,
with TTLs on an injected monotonic clock, bounded by entry count (least recently used goes first)."""

from __future__ import annotations

import builtins
import fnmatch
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from companion.cache.keys import PREFIX

Monotonic = Callable[[], float]


class MemoryBackend:
    name = "memory"

    def __init__(self, *, max_entries: int = 100_000, clock: Monotonic = time.monotonic) -> None:
        self._data: OrderedDict[str, tuple[bytes | set[str], float | None]] = OrderedDict()
        self._max_entries = max_entries
        self._clock = clock
        self.published: list[tuple[str, bytes]] = []

    def _live(self, key: str) -> bytes | set[str] | None:
        item = self._data.get(key)
        if item is None:
            return None
        value, expires = item
        if expires is not None and expires <= self._clock():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return value

    def _put(self, key: str, value: bytes | set[str], ttl_seconds: float | None) -> None:
        expires = None if ttl_seconds is None else self._clock() + ttl_seconds
        self._data[key] = (value, expires)
        self._data.move_to_end(key)
        while len(self._data) > self._max_entries:
            self._data.popitem(last=False)

    async def get(self, key: str) -> bytes | None:
        value = self._live(key)
        return value if isinstance(value, bytes) else None

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        return [await self.get(key) for key in keys]

    async def set(self, key: str, value: bytes, ttl_seconds: float | None = None) -> None:
        self._put(key, value, ttl_seconds)

    async def add(self, key: str, value: bytes, ttl_seconds: float) -> bool:
        if self._live(key) is not None:
            return False
        self._put(key, value, ttl_seconds)
        return True

    async def set_if_locked(self, key: str, value: bytes, ttl_seconds: float, lock_key: str, token: str) -> bool:
        if await self.get(lock_key) != token.encode():
            return False
        self._put(key, value, ttl_seconds)
        self._data.pop(lock_key, None)
        return True

    async def delete(self, *keys: str) -> int:
        removed = 0
        for key in keys:
            if self._live(key) is not None:
                removed += 1
            self._data.pop(key, None)
        return removed

    async def expire(self, key: str, ttl_seconds: float) -> bool:
        value = self._live(key)
        if value is None:
            return False
        self._put(key, value, ttl_seconds)
        return True

    async def incr(self, key: str) -> int:
        value = self._live(key)
        number = int(value) + 1 if isinstance(value, bytes) else 1
        expires = self._data[key][1] if value is not None else None
        self._data[key] = (str(number).encode(), expires)
        return number

    async def sadd(self, key: str, member: str, ttl_seconds: float | None = None) -> None:
        value = self._live(key)
        members = set(value) if isinstance(value, set) else set()
        members.add(member)
        self._put(key, members, ttl_seconds if ttl_seconds is not None else self._ttl_left(key))

    def _ttl_left(self, key: str) -> float | None:
        item = self._data.get(key)
        if item is None or item[1] is None:
            return None
        return max(item[1] - self._clock(), 0.0)

    async def srem(self, key: str, member: str) -> None:
        value = self._live(key)
        if isinstance(value, set):
            value.discard(member)

    async def smembers(self, key: str) -> builtins.set[str]:
        value = self._live(key)
        return set(value) if isinstance(value, set) else set()

    async def delete_matching(self, pattern: str) -> int:
        # The same refusal as RedisBackend, so code tried on this backend cannot surprise on Redis.
        if not pattern.startswith(PREFIX + ":"):
            raise ValueError("refusing to delete outside the companion namespace")
        doomed = [key for key in list(self._data) if fnmatch.fnmatchcase(key, pattern)]
        for key in doomed:
            del self._data[key]
        return len(doomed)

    async def publish(self, channel: str, message: bytes) -> None:
        # One process: nobody else to tell. Kept for tests that inspect what would travel.
        self.published.append((channel, message))
        del self.published[:-100]

    async def ping(self) -> float:
        return 0.0

    async def aclose(self) -> None:
        self._data.clear()
