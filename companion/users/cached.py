"""API-key authentication behind the tiered cache: every request authenticates, so the key's owner
is cached by the key's hash (never the key itself). Unknown keys are not cached: a key created a
moment ago must work at once, and guessing must not fill the cache."""

from __future__ import annotations

import uuid

from pydantic import BaseModel, ConfigDict

from companion.cache import keys
from companion.cache.codec import ModelCodec
from companion.cache.tiered import Cached, TieredCache
from companion.storage.database import Database
from companion.types import Clock, utcnow
from companion.users.service import UserService


class _Owner(BaseModel):
    model_config = ConfigDict(frozen=True)
    user_id: uuid.UUID


class CachedUserService(UserService):
    def __init__(
        self, database: Database, cache: TieredCache, clock: Clock = utcnow, *, ttl: float = 300, local_ttl: float = 60
    ) -> None:
        super().__init__(database, clock)
        self._cached = Cached(cache, ModelCodec(_Owner), ttl=ttl, local_ttl=local_ttl)

    async def _owner_of(self, key_hash: str) -> uuid.UUID | None:
        async def load() -> _Owner | None:
            user_id = await UserService._owner_of(self, key_hash)
            return _Owner(user_id=user_id) if user_id else None

        owner = await self._cached.get(keys.api_key(key_hash), load)
        return owner.user_id if owner else None
