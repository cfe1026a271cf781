"""API-key authentication behind the tiered cache: every request authenticates, so the key's owner
is cached by the key's hash (never the key itself). Unknown keys are not cached: a key created a
moment ago must work at once, and guessing must not fill the cache.

Revoking a key invalidates its cached owner through the cache (this L1, Redis, and every other
instance's L1 over the invalidation channel; replayed after a Redis outage), so a revoked key is
refused everywhere within the channel's delay, not after the cache TTL.

When a key was last used is gathered in memory and written in one batch every
API_KEY_LAST_USED_FLUSH_SECONDS (and at shutdown): at most one write per key per interval and
instance, never a database write per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict

from companion.cache import keys
from companion.cache.codec import ModelCodec
from companion.cache.local import MISSING
from companion.cache.tiered import Cached, TieredCache
from companion.storage.database import Database
from companion.types import Clock, utcnow
from companion.users.service import ApiKeyInfo, Gate, KeyOwner, UserService

logger = logging.getLogger(__name__)


class _Owner(BaseModel):
    model_config = ConfigDict(frozen=True)
    user_id: uuid.UUID
    key_id: uuid.UUID | None = None  # absent in entries cached before keys had a lifecycle


class CachedUserService(UserService):
    def __init__(
        self,
        database: Database,
        cache: TieredCache,
        clock: Clock = utcnow,
        *,
        ttl: float = 300,
        local_ttl: float = 60,
        max_keys_per_user: int = 20,
        last_used_flush_seconds: float = 60,
    ) -> None:
        super().__init__(database, clock, max_keys_per_user=max_keys_per_user)
        self._cache = cache
        self._cached = Cached(cache, ModelCodec(_Owner), ttl=ttl, local_ttl=local_ttl)
        self._used: dict[uuid.UUID, datetime] = {}
        self.last_used_flush_seconds = last_used_flush_seconds
        self._flusher: asyncio.Task[None] | None = None

    async def _owner_of(self, key_hash: str, gate: Gate | None) -> KeyOwner | None:
        key = keys.api_key(key_hash)
        if gate is not None and self._cache.local.get(key) is MISSING:
            await gate()  # past L1 a lookup costs a round trip, and a miss reaches the database

        async def load() -> _Owner | None:
            found = await UserService._owner_of(self, key_hash, None)
            return _Owner(user_id=found.user_id, key_id=found.key_id) if found else None

        owner = await self._cached.get(key, load)
        if owner is None:
            return None
        if owner.key_id is not None:
            self._used[owner.key_id] = self._clock()
        return KeyOwner(owner.user_id, owner.key_id, key_hash)

    async def revoke_key(self, user_id: uuid.UUID, key_id: uuid.UUID, *, allow_last: bool = False) -> str:
        key_hash = await super().revoke_key(user_id, key_id, allow_last=allow_last)
        self._used.pop(key_id, None)
        await self._cache.invalidate(keys.api_key(key_hash))
        return key_hash

    async def list_keys(self, user_id: uuid.UUID) -> list[ApiKeyInfo]:
        await self.flush_last_used()  # this instance's uses show at once; others' within an interval
        return await super().list_keys(user_id)

    # --- last used ----------------------------------------------------------------------------------

    def start(self) -> None:
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_periodically(), name="api-key-last-used")

    async def flush_last_used(self) -> None:
        used, self._used = self._used, {}
        try:
            await self.record_use(used)
        except Exception:
            # Not worth failing a request over: keep them for the next try (newer uses win).
            for key_id, at in used.items():
                self._used.setdefault(key_id, at)
            logger.warning("could not record when %d API keys were last used", len(used))

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.last_used_flush_seconds)
            try:
                await self.flush_last_used()
            except Exception:
                logger.exception("recording API key use failed")

    async def aclose(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        with contextlib.suppress(Exception):
            await self.flush_last_used()
