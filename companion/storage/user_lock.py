"""Per-user caps that hold under concurrency: a create that counts a user's rows and then inserts
one first takes this lock on the user's row, in the same transaction, so that two creates of one
user are counted one after the other and never both fit under the cap."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from companion.storage.models import User


async def lock_user(session: AsyncSession, user_id: uuid.UUID) -> bool:
    """Hold the user's row until the transaction ends; False if there is no such user.

    PostgreSQL: `FOR NO KEY UPDATE`, which serialises the user's cap checks (and the memory
    generation's bumps) but not the inserts that only reference the user (they take KEY SHARE).
    SQLite ignores the clause: there every transaction begins IMMEDIATE, so writers are serialised
    already (companion.storage.database)."""
    found = await session.execute(select(User.id).where(User.id == user_id).with_for_update(key_share=True))
    return found.scalar_one_or_none() is not None
