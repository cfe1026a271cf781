"""Preferences read through the tiered cache (TTL 300 s by default), invalidated on every write, so
a PUT on one instance is seen by a chat on another at once."""

from __future__ import annotations

import uuid

from companion.cache import keys
from companion.cache.codec import ModelCodec
from companion.cache.tiered import Cached, TieredCache
from companion.preferences.schemas import Preferences
from companion.preferences.service import PreferenceService
from companion.storage.database import Database
from companion.types import Clock, utcnow


class CachedPreferenceService(PreferenceService):
    def __init__(
        self, database: Database, cache: TieredCache, clock: Clock = utcnow, *, ttl: float = 300, local_ttl: float = 60
    ) -> None:
        super().__init__(database, clock)
        self._cache = cache
        self._cached = Cached(cache, ModelCodec(Preferences), ttl=ttl, local_ttl=min(local_ttl, ttl))

    async def get(self, user_id: uuid.UUID) -> Preferences:
        async def load() -> Preferences:
            return await PreferenceService.get(self, user_id)

        found = await self._cached.get(keys.preferences(user_id), load)
        assert found is not None  # the loader always returns preferences (defaults if unset)
        return found

    async def put(self, user_id: uuid.UUID, preferences: Preferences) -> Preferences:
        stored = await super().put(user_id, preferences)
        await self._cache.invalidate(keys.preferences(user_id))
        return stored
