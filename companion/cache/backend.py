"""The storage interface both cache backends implement: a few byte-level operations.

`RedisBackend` and `MemoryBackend` store the same encoded bytes; key building, serialization,
metrics, tiers and failure handling live above them (`companion.cache.tiered`). Backends raise
`CacheUnavailable` when they cannot serve; they never invent a value.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from typing import Protocol


class CacheUnavailable(Exception):
    """The backend cannot be reached or is too slow right now (or its circuit is open)."""


class CacheBackend(Protocol):
    name: str

    async def get(self, key: str) -> bytes | None: ...

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]: ...

    async def set(self, key: str, value: bytes, ttl_seconds: float | None = None) -> None: ...

    async def add(self, key: str, value: bytes, ttl_seconds: float) -> bool:
        """Set only if absent (a lock). True if this call set it."""
        ...

    async def set_if_locked(self, key: str, value: bytes, ttl_seconds: float, lock_key: str, token: str) -> bool:
        """Atomically: if `lock_key` still holds `token`, set `key` and release the lock. A writer
        that invalidated `key` in the meantime also deleted the lock, so a loader that read the
        database before that write can never put its stale value back."""
        ...

    async def delete(self, *keys: str) -> int: ...

    async def expire(self, key: str, ttl_seconds: float) -> bool: ...

    async def incr(self, key: str) -> int: ...

    async def sadd(self, key: str, member: str, ttl_seconds: float | None = None) -> None: ...

    async def srem(self, key: str, member: str) -> None: ...

    async def smembers(self, key: str) -> builtins.set[str]: ...

    async def delete_matching(self, pattern: str) -> int:
        """Delete keys matching a glob pattern inside our prefix (SCAN + UNLINK on Redis)."""
        ...

    async def publish(self, channel: str, message: bytes) -> None: ...

    async def ping(self) -> float:
        """Round trip in ms. Raises CacheUnavailable."""
        ...

    async def aclose(self) -> None: ...
