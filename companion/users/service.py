"""Users and their API keys. Keys are shown once at creation and stored only as SHA-256 hashes:
they are 256-bit random strings, so a slow password hash would add cost and no safety."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass

from sqlalchemy import select

from companion.errors import Unauthorized
from companion.storage.database import Database
from companion.storage.models import ApiKey, User
from companion.types import Clock, utcnow

KEY_PREFIX = "cmp_"
INVALID_KEY = "Invalid API key. Create one with `companion users create NAME`."


def hash_api_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class CreatedUser:
    id: uuid.UUID
    name: str
    api_key: str


class UserService:
    def __init__(self, database: Database, clock: Clock = utcnow) -> None:
        self._db = database
        self._clock = clock

    async def create(self, name: str) -> CreatedUser:
        """Create a user with one new API key; the key is returned here and never again."""
        name = name.strip()
        if not name or len(name) > 100:
            raise ValueError("a user name must be 1-100 characters")
        api_key = KEY_PREFIX + secrets.token_urlsafe(32)
        now = self._clock()
        async with self._db.session() as session:
            user = User(id=uuid.uuid4(), name=name, created_at=now)
            session.add(user)
            await session.flush()
            session.add(
                ApiKey(
                    id=uuid.uuid4(),
                    user_id=user.id,
                    key_hash=hash_api_key(api_key),
                    prefix=api_key[:12],
                    created_at=now,
                )
            )
        return CreatedUser(id=user.id, name=name, api_key=api_key)

    async def authenticate(self, api_key: str) -> uuid.UUID:
        """Return the user id owning `api_key`. Raises Unauthorized for unknown or revoked keys."""
        if not api_key.startswith(KEY_PREFIX) or len(api_key) > 200:
            raise Unauthorized(INVALID_KEY)
        user_id = await self._owner_of(hash_api_key(api_key))
        if user_id is None:
            raise Unauthorized(INVALID_KEY)
        return user_id

    async def _owner_of(self, key_hash: str) -> uuid.UUID | None:
        async with self._db.session() as session:
            row = (
                await session.execute(
                    select(ApiKey.user_id).where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))
                )
            ).first()
        return row[0] if row else None

    async def find_by_name(self, name: str) -> uuid.UUID | None:
        async with self._db.session() as session:
            row = (
                await session.execute(select(User.id).where(User.name == name).order_by(User.created_at).limit(1))
            ).first()
        return row[0] if row else None

    async def create_without_key(self, name: str) -> uuid.UUID:
        """A user for in-process use (the terminal chat on embedded defaults); it has no API key."""
        async with self._db.session() as session:
            user = User(id=uuid.uuid4(), name=name, created_at=self._clock())
            session.add(user)
        return user.id
