"""One turn at a time per conversation.

A message that arrives while a reply in the same conversation is still streaming waits for that
turn to finish (up to TURN_WAIT_SECONDS), so every prompt sees the previous exchange complete and
messages are never interleaved; if the wait runs out it gets 409 `conversation_busy` and nothing is
stored. Across instances the lock is a Redis key (`SET NX PX`, renewed while the turn runs, released
only by its owner); with Redis off, or unreachable, it is an in-process lock with the same
behaviour on one instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Protocol

from companion.cache import keys
from companion.cache.backend import CacheUnavailable
from companion.cache.redis import RedisBackend
from companion.errors import Conflict
from companion.locks import KeyedLocks

logger = logging.getLogger(__name__)

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


def busy(conversation_id: uuid.UUID) -> Conflict:
    return Conflict(
        "A reply is still being generated in this conversation; send your message when it has finished.",
        code="conversation_busy",
    )


class TurnLock(Protocol):
    def hold(self, conversation_id: uuid.UUID) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold the conversation for one turn. Raises Conflict (409) if it stays busy too long."""
        ...


class LocalTurnLock:
    def __init__(self, *, wait_seconds: float = 30.0) -> None:
        self.wait_seconds = wait_seconds
        self._locks: KeyedLocks[uuid.UUID] = KeyedLocks()

    @contextlib.asynccontextmanager
    async def hold(self, conversation_id: uuid.UUID) -> AsyncIterator[None]:
        async with self._locks.hold(
            conversation_id, wait_seconds=self.wait_seconds, on_timeout=lambda: busy(conversation_id)
        ):
            yield

    def users(self, conversation_id: uuid.UUID) -> int:
        """Turns of this instance holding or waiting for the conversation."""
        return self._locks.users(conversation_id)


class RedisTurnLock:
    def __init__(
        self,
        backend: RedisBackend,
        *,
        wait_seconds: float = 30.0,
        lease_seconds: float = 30.0,
        poll_seconds: float = 0.02,
    ) -> None:
        self._backend = backend
        self.wait_seconds = wait_seconds
        self.lease_seconds = lease_seconds
        self.poll_seconds = poll_seconds
        self._release = backend.client.register_script(_RELEASE)
        self._renew = backend.client.register_script(_RENEW)
        # Also serializes turns within this instance, and stands in when Redis is unreachable.
        self._local = LocalTurnLock(wait_seconds=wait_seconds)
        # Leases whose release could not reach Redis (key -> our token). A Redis that keeps its
        # data comes back with them, and each would hold its conversation until it expires.
        self._unreleased: dict[str, str] = {}
        backend.on_recovery.append(self._release_unreleased)

    @contextlib.asynccontextmanager
    async def hold(self, conversation_id: uuid.UUID) -> AsyncIterator[None]:
        async with self._local.hold(conversation_id):
            key = keys.conversation_lock(conversation_id)
            token = uuid.uuid4().hex
            held = await self._acquire(conversation_id, key, token)
            done = asyncio.Event()
            renewer = asyncio.create_task(self._keep(key, token, done)) if held else None
            try:
                yield
            finally:
                if renewer is not None:
                    # The event, not only the cancellation, ends the renewer: under overload a
                    # cancellation can be lost in the Redis client's nested timeouts, and a renewer
                    # that looped on would hold this turn (and its admission slot) forever.
                    done.set()
                    renewer.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await renewer
                if held:
                    try:
                        await self._backend.run(lambda: self._release(keys=[key], args=[token]))
                    except CacheUnavailable:
                        # Released when Redis is back (or before this conversation's next turn here).
                        if len(self._unreleased) < 10_000:
                            self._unreleased[key] = token

    async def _release_unreleased(self, key: str | None = None) -> None:
        """Release our leases left behind by an outage (all, or the one for `key`)."""
        for lease in [key] if key is not None else list(self._unreleased):
            token = self._unreleased.get(lease)
            if token is None:
                continue
            try:
                await self._backend.run(functools.partial(self._release, keys=[lease], args=[token]))
            except CacheUnavailable:
                return
            self._unreleased.pop(lease, None)

    async def _acquire(self, conversation_id: uuid.UUID, key: str, token: str) -> bool:
        """True when we hold the Redis lease; False when Redis is unreachable (local lock only)."""
        if key in self._unreleased:
            # Our own lease from a turn that ended during an outage: this instance holds the
            # conversation's local lock now, so no turn of ours still runs under it.
            await self._release_unreleased(key)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_seconds
        while True:
            try:
                if await self._backend.add(key, token.encode(), self.lease_seconds):
                    return True
            except CacheUnavailable:
                logger.warning("turn lock falling back to this instance only: Redis unreachable")
                return False
            if loop.time() >= deadline:
                raise busy(conversation_id)
            await asyncio.sleep(self.poll_seconds)

    async def _keep(self, key: str, token: str, done: asyncio.Event) -> None:
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.lease_seconds / 3):
                    await done.wait()
            if done.is_set():
                return
            try:
                await self._backend.run(lambda: self._renew(keys=[key], args=[token, int(self.lease_seconds * 1000)]))
            except CacheUnavailable:
                continue
