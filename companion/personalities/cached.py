"""Personality resolution behind the tiered cache. Every chat request resolves (user, name); after
warm-up that is an L1 hit. Unknown names are cached briefly as misses. Creating, updating or
deleting a user's personality invalidates that (user, name) entry on every instance; a change to a
global personality (operators only) drops the name for all users."""

from __future__ import annotations

import uuid

from companion.cache import keys
from companion.cache.codec import ModelCodec
from companion.cache.tiered import Cached, TieredCache
from companion.errors import NotFound
from companion.interchange.cards import ParsedCard
from companion.personalities.schemas import PersonalityCreate, PersonalityOut, PersonalityUpdate
from companion.personalities.service import PersonalityService, _not_found
from companion.storage.database import Database
from companion.types import Clock, is_valid_name, utcnow


class CachedPersonalityService(PersonalityService):
    def __init__(
        self,
        database: Database,
        cache: TieredCache,
        clock: Clock = utcnow,
        *,
        ttl: float = 3600,
        local_ttl: float = 60,
        miss_ttl: float = 30,
        max_per_user: int = 100,
    ) -> None:
        super().__init__(database, clock, max_per_user=max_per_user)
        self._cache = cache
        self._cached = Cached(cache, ModelCodec(PersonalityOut), ttl=ttl, local_ttl=local_ttl, miss_ttl=miss_ttl)

    async def resolve(self, user_id: uuid.UUID, name: str) -> PersonalityOut:
        if not is_valid_name(name):
            raise _not_found(name)

        async def load() -> PersonalityOut | None:
            try:
                return await PersonalityService.resolve(self, user_id, name)
            except NotFound:
                return None

        found = await self._cached.get(keys.personality(user_id, name), load)
        if found is None:
            raise _not_found(name)
        return found

    async def create(self, user_id: uuid.UUID, data: PersonalityCreate) -> PersonalityOut:
        created = await super().create(user_id, data)
        await self._cache.invalidate(keys.personality(user_id, data.name))
        return created

    async def import_card(self, user_id: uuid.UUID, parsed: ParsedCard, name: str | None = None) -> PersonalityOut:
        created = await super().import_card(user_id, parsed, name)
        await self._cache.invalidate(keys.personality(user_id, created.name))
        return created

    async def update(self, user_id: uuid.UUID, name: str, data: PersonalityUpdate) -> PersonalityOut:
        updated = await super().update(user_id, name, data)
        await self._cache.invalidate(keys.personality(user_id, name))
        return updated

    async def delete(self, user_id: uuid.UUID, name: str) -> None:
        await super().delete(user_id, name)
        await self._cache.invalidate(keys.personality(user_id, name))

    async def invalidate_global(self, name: str | None = None) -> int:
        """After an operator edits a global personality: drop it (or all) for every user."""
        return await self._cache.invalidate_matching(keys.personality_pattern(name))
