"""Read and replace a user's preferences (defaults until they set any)."""

from __future__ import annotations

import uuid

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from companion.preferences.schemas import Preferences
from companion.storage.database import Database
from companion.storage.models import Preferences as PreferencesRow
from companion.types import Clock, utcnow


class PreferenceService:
    def __init__(self, database: Database, clock: Clock = utcnow) -> None:
        self._db = database
        self._clock = clock

    async def get(self, user_id: uuid.UUID) -> Preferences:
        async with self._db.session() as session:
            data = (
                await session.execute(select(PreferencesRow.data).where(PreferencesRow.user_id == user_id))
            ).scalar_one_or_none()
        # Stored data was validated on write; a later, stricter schema must not make reads fail.
        return Preferences.model_validate(data) if data else Preferences()

    async def put(self, user_id: uuid.UUID, preferences: Preferences) -> Preferences:
        """Replace the user's preferences. Concurrent first writes are safe: the loser updates."""
        data = preferences.model_dump(mode="json")
        stmt = update(PreferencesRow).where(PreferencesRow.user_id == user_id)
        async with self._db.session() as session:
            result = await session.execute(stmt.values(data=data, updated_at=self._clock()))
            inserted = result.rowcount == 0  # type: ignore[attr-defined]
        if inserted:
            try:
                async with self._db.session() as session:
                    session.add(PreferencesRow(user_id=user_id, data=data, updated_at=self._clock()))
            except IntegrityError:
                async with self._db.session() as session:
                    await session.execute(stmt.values(data=data, updated_at=self._clock()))
        return preferences
