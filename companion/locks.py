"""One asyncio lock per key (a conversation, a user), kept only while someone holds or waits for it,
so the table never grows with the number of keys ever seen."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class KeyedLocks(Generic[K]):
    def __init__(self) -> None:
        self._locks: dict[K, asyncio.Lock] = {}
        self._users: dict[K, int] = {}  # holders and waiters per key: the lock goes with the last one

    def __len__(self) -> int:
        return len(self._locks)

    def users(self, key: K) -> int:
        """How many hold or wait for `key` right now."""
        return self._users.get(key, 0)

    @contextlib.asynccontextmanager
    async def hold(
        self, key: K, *, wait_seconds: float | None = None, on_timeout: Callable[[], Exception] | None = None
    ) -> AsyncIterator[None]:
        """Hold `key`'s lock for the block. Waiting longer than `wait_seconds` raises `on_timeout()` (or
        TimeoutError); the block's own exceptions pass through unchanged."""
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._users[key] = self._users.get(key, 0) + 1
        try:
            try:
                async with asyncio.timeout(wait_seconds):
                    await lock.acquire()
            except TimeoutError:
                if on_timeout is None:
                    raise
                raise on_timeout() from None
            try:
                yield
            finally:
                lock.release()
        finally:
            self._users[key] -= 1
            if not self._users[key]:
                del self._users[key]
                del self._locks[key]
