"""Users and their API keys. Keys are shown once at creation and stored only as SHA-256 hashes:
they are 256-bit random strings, so a slow password hash would add cost and no safety.

A user has several named keys, each revocable on its own. Revoking the last active key of a user
is refused unless the caller says so (`allow_last`): the API never does, so a key cannot lock its
own user out by accident; the operator's CLI may, with `--allow-last`.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

from pydantic import BaseModel
from sqlalchemy import func, or_, select, update

from companion.errors import Conflict, NotFound, Unauthorized
from companion.storage.database import Database
from companion.storage.models import ApiKey, User
from companion.storage.user_lock import lock_user
from companion.types import Clock, utcnow

KEY_PREFIX = "cmp_"
INVALID_KEY = "Invalid API key. Create one with `companion users create NAME`."
DEFAULT_KEY_NAME = "default"

# Called before a key is looked up where the lookup costs (the database): the failed-authentication
# limit refuses an address that is over it there, before any lookup.
Gate = Callable[[], Awaitable[None]]


def hash_api_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class CreatedUser:
    id: uuid.UUID
    name: str
    api_key: str


@dataclass(frozen=True)
class KeyOwner:
    """Who a presented key belongs to, and which of their keys it is."""

    user_id: uuid.UUID
    key_id: uuid.UUID | None  # None only for owners cached before keys had ids in the cache
    key_hash: str


class ApiKeyInfo(BaseModel):
    id: uuid.UUID
    name: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


@dataclass(frozen=True)
class CreatedKey:
    info: ApiKeyInfo
    api_key: str


def _info(row: ApiKey) -> ApiKeyInfo:
    return ApiKeyInfo(
        id=row.id,
        name=row.name,
        prefix=row.prefix,
        created_at=row.created_at,
        last_used_at=row.last_used_at,
        revoked_at=row.revoked_at,
    )


def _key_not_found() -> NotFound:
    return NotFound("No such API key. List yours with GET /v1/api-keys.", code="api_key_not_found")


def _check_key_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > 100:
        raise ValueError("a key name must be 1-100 characters")
    return name


class UserService:
    def __init__(self, database: Database, clock: Clock = utcnow, *, max_keys_per_user: int = 20) -> None:
        self._db = database
        self._clock = clock
        self.max_keys_per_user = max_keys_per_user

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
            session.add(self._key_row(user.id, api_key, DEFAULT_KEY_NAME, now))
        return CreatedUser(id=user.id, name=name, api_key=api_key)

    @staticmethod
    def _key_row(user_id: uuid.UUID, api_key: str, name: str, now: datetime) -> ApiKey:
        return ApiKey(
            id=uuid.uuid4(),
            user_id=user_id,
            key_hash=hash_api_key(api_key),
            prefix=api_key[:12],
            name=name,
            created_at=now,
        )

    async def authenticate(self, api_key: str, *, gate: Gate | None = None) -> uuid.UUID:
        """Return the user id owning `api_key`. Raises Unauthorized for unknown or revoked keys."""
        return (await self.authenticate_key(api_key, gate=gate)).user_id

    async def authenticate_key(self, api_key: str, *, gate: Gate | None = None) -> KeyOwner:
        """The owner of `api_key` and which key it is. Raises Unauthorized for unknown or revoked
        keys; `gate` runs before a lookup that would reach the database (and may raise)."""
        if not api_key.startswith(KEY_PREFIX) or len(api_key) > 200:
            raise Unauthorized(INVALID_KEY)
        owner = await self._owner_of(hash_api_key(api_key), gate)
        if owner is None:
            raise Unauthorized(INVALID_KEY)
        return owner

    async def owner_of_hash(self, key_hash: str) -> KeyOwner | None:
        """The owner of the key with this hash while it is active (sessions check their key)."""
        return await self._owner_of(key_hash, None)

    async def _owner_of(self, key_hash: str, gate: Gate | None) -> KeyOwner | None:
        if gate is not None:
            await gate()
        async with self._db.session() as session:
            row = (
                await session.execute(
                    select(ApiKey.user_id, ApiKey.id).where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))
                )
            ).first()
        return KeyOwner(row[0], row[1], key_hash) if row else None

    # --- key lifecycle ------------------------------------------------------------------------------

    async def list_keys(self, user_id: uuid.UUID) -> list[ApiKeyInfo]:
        """The user's keys, active and revoked, oldest first."""
        async with self._db.session() as session:
            rows = (
                await session.execute(
                    select(ApiKey).where(ApiKey.user_id == user_id).order_by(ApiKey.created_at, ApiKey.id)
                )
            ).scalars()
            return [_info(row) for row in rows]

    async def create_key(self, user_id: uuid.UUID, name: str) -> CreatedKey:
        """A new key for the user, returned this once. Raises ValueError for a bad name, NotFound
        for an unknown user, Conflict past the per-user cap of active keys."""
        name = _check_key_name(name)
        api_key = KEY_PREFIX + secrets.token_urlsafe(32)
        row = self._key_row(user_id, api_key, name, self._clock())
        async with self._db.session() as session:
            if not await lock_user(session, user_id):  # the count below holds until this one is in
                raise NotFound("No such user.", code="user_not_found")
            active = (
                await session.execute(
                    select(func.count()).where(ApiKey.user_id == user_id, ApiKey.revoked_at.is_(None))
                )
            ).scalar_one()
            if active >= self.max_keys_per_user:
                raise Conflict(
                    f"You already have {active} active API keys (API_KEYS_MAX_PER_USER={self.max_keys_per_user}); "
                    "revoke one with DELETE /v1/api-keys/{id} first.",
                    code="too_many_api_keys",
                )
            session.add(row)
        return CreatedKey(_info(row), api_key)

    async def revoke_key(self, user_id: uuid.UUID, key_id: uuid.UUID, *, allow_last: bool = False) -> str:
        """Revoke one of the user's keys; returns its hash (to drop it from caches). Raises NotFound
        (no such active key of this user) or Conflict (the user's last active key, unless
        `allow_last`)."""
        async with self._db.session() as session:
            row = (
                await session.execute(
                    select(ApiKey)
                    .where(ApiKey.id == key_id, ApiKey.user_id == user_id, ApiKey.revoked_at.is_(None))
                    .with_for_update()
                )
            ).scalar_one_or_none()
            if row is None:
                raise _key_not_found()
            if not allow_last:
                # Lock the user's other active keys too, so two concurrent revocations cannot each
                # see the other's key as the one that stays.
                others = (
                    await session.execute(
                        select(ApiKey.id)
                        .where(ApiKey.user_id == user_id, ApiKey.revoked_at.is_(None), ApiKey.id != key_id)
                        .with_for_update()
                    )
                ).all()
                if not others:
                    raise Conflict(
                        "This is your last active API key: create another (POST /v1/api-keys) before revoking it.",
                        code="last_api_key",
                    )
            row.revoked_at = self._clock()
            return row.key_hash

    async def record_use(self, used: Mapping[uuid.UUID, datetime]) -> None:
        """Store when keys were last used (a batch gathered in memory; later times only win)."""
        if not used:
            return
        async with self._db.session() as session:
            for key_id, at in used.items():
                await session.execute(
                    update(ApiKey)
                    .where(ApiKey.id == key_id, or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < at))
                    .values(last_used_at=at)
                )

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
