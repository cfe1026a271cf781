"""Server-side sessions with a sliding TTL, for the web page: a session lives in the cache backend
(Redis, or in-process when Redis is off), together with a per-user index so a user can list and
revoke theirs. The token handed to the browser is `cms_<user>.<session id>.<secret>`; only a hash
of the secret is stored, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TypeVar

import orjson
from pydantic import BaseModel

from companion.cache import keys
from companion.cache.backend import CacheBackend, CacheUnavailable
from companion.errors import NotFound
from companion.types import Clock, utcnow

TOKEN_PREFIX = "cms_"
T = TypeVar("T")


class SessionInfo(BaseModel):
    id: str
    user_id: uuid.UUID
    created_at: datetime
    last_seen_at: datetime
    user_agent: str | None = None


class _Stored(SessionInfo):
    secret_hash: str


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_token(token: str) -> tuple[uuid.UUID, str, str] | None:
    if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        return None
    try:
        user_hex, session_id, secret = token[len(TOKEN_PREFIX) :].split(".")
        return uuid.UUID(hex=user_hex), session_id, secret
    except ValueError:
        return None


class SessionService:
    def __init__(
        self,
        backend: CacheBackend,
        *,
        fallback: CacheBackend | None = None,
        ttl_seconds: float = 12 * 3600,
        clock: Clock = utcnow,
    ) -> None:
        self._backend = backend
        # Sessions made while Redis is unreachable live in this process until it is back.
        self._fallback = fallback
        self.ttl_seconds = ttl_seconds
        self._clock = clock

    async def _with_fallback(self, operation: Callable[[CacheBackend], Awaitable[T]]) -> T:
        try:
            return await operation(self._backend)
        except CacheUnavailable:
            if self._fallback is None:
                raise
            return await operation(self._fallback)

    async def create(self, user_id: uuid.UUID, *, user_agent: str | None = None) -> tuple[str, SessionInfo]:
        session_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(24)
        now = self._clock()
        stored = _Stored(
            id=session_id,
            user_id=user_id,
            created_at=now,
            last_seen_at=now,
            user_agent=(user_agent or "")[:200] or None,
            secret_hash=_hash(secret),
        )

        async def write(backend: CacheBackend) -> None:
            await backend.set(keys.session(user_id, session_id), stored.model_dump_json().encode(), self.ttl_seconds)
            await backend.sadd(keys.session_index(user_id), session_id, self.ttl_seconds)

        await self._with_fallback(write)
        token = f"{TOKEN_PREFIX}{user_id.hex}.{session_id}.{secret}"
        return token, SessionInfo(**stored.model_dump(exclude={"secret_hash"}))

    async def authenticate(self, token: str) -> SessionInfo | None:
        """The session for `token` (sliding its expiry), or None if unknown, expired or revoked."""
        parsed = parse_token(token)
        if parsed is None:
            return None
        user_id, session_id, secret = parsed
        key = keys.session(user_id, session_id)

        async def read(backend: CacheBackend) -> bytes | None:
            data = await backend.get(key)
            if data is not None:
                await backend.expire(key, self.ttl_seconds)
                await backend.expire(keys.session_index(user_id), self.ttl_seconds)
            return data

        data = await self._with_fallback(read)
        if data is None and self._fallback is not None:
            # Made while Redis was unreachable: it lives here, and slides here too.
            data = await read(self._fallback)
        if data is None:
            return None
        stored = _Stored.model_validate_json(data)
        if not hmac.compare_digest(stored.secret_hash, _hash(secret)) or stored.user_id != user_id:
            return None
        return SessionInfo(**stored.model_dump(exclude={"secret_hash"}))

    async def list(self, user_id: uuid.UUID) -> list[SessionInfo]:
        async def read(backend: CacheBackend) -> list[SessionInfo]:
            ids: list[str] = sorted(await backend.smembers(keys.session_index(user_id)))
            values = await backend.mget([keys.session(user_id, i) for i in ids])
            sessions = []
            for session_id, data in zip(ids, values, strict=True):
                if data is None:
                    await backend.srem(keys.session_index(user_id), session_id)  # expired: tidy the index
                    continue
                stored = orjson.loads(data)
                stored.pop("secret_hash", None)
                sessions.append(SessionInfo.model_validate(stored))
            return sessions

        found = {session.id: session for session in await self._with_fallback(read)}
        if self._fallback is not None:
            # Sessions made while Redis was unreachable still authenticate, so they are listed too.
            for session in await read(self._fallback):
                found.setdefault(session.id, session)
        return sorted(found.values(), key=lambda s: s.created_at)

    async def revoke(self, user_id: uuid.UUID, session_id: str) -> None:
        """Raises NotFound if the user has no such session."""

        async def remove(backend: CacheBackend) -> int:
            removed = await backend.delete(keys.session(user_id, session_id))
            await backend.srem(keys.session_index(user_id), session_id)
            return removed

        removed = await self._with_fallback(remove)
        if self._fallback is not None:
            removed += await remove(self._fallback)
        if not removed:
            raise NotFound("No such session. List yours with GET /v1/sessions.", code="session_not_found")
