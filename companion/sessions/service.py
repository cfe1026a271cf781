"""Server-side sessions with a sliding TTL, for the web page: a session lives in the cache backend
(Redis, or in-process when Redis is off), together with a per-user index so a user can list and
revoke theirs. The token handed to the browser is `cms_<user>.<session id>.<secret>`; only a hash
of the secret is stored, compared in constant time.

A session remembers the API key it was made from (by id, and by hash so the caller can check the key
is still active): revoking the key ends the sessions made from it. A user holds at most
SESSIONS_MAX_PER_USER sessions (409 past it), so one user cannot crowd out others' sessions. The
count and the write are one step (a script on Redis; in process, no await between them), so
concurrent sign-ins, on one instance or several, cannot take a user past the cap.

A revocation that cannot reach Redis is not pretended: `revoke` raises `RevocationDeferred` (503),
the session is refused by this instance from then on, and the revocation is replayed as soon as
Redis answers again (on the breaker's recovery, the invalidation channel's reconnect, or the next
session operation), as deferred cache invalidations are."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TypeVar

import orjson
from pydantic import BaseModel

from companion.cache import keys
from companion.cache.backend import CacheBackend, CacheUnavailable
from companion.cache.redis import RedisBackend
from companion.errors import Conflict, NotFound, ServiceUnavailable
from companion.types import Clock, utcnow

logger = logging.getLogger(__name__)
TOKEN_PREFIX = "cms_"
T = TypeVar("T")
MAX_PENDING_REVOCATIONS = 100_000

# KEYS[1]: the user's session index, KEYS[2]: the new session. ARGV: session key prefix, cap, sessions
# held elsewhere (in process, made during an outage), the new session's value, ttl ms, its id.
# Returns -1 when stored, else the number of sessions held (refused, nothing written). The session
# keys of the index's members are built here: they share the user's hash tag, so one cluster slot.
_CREATE = """
local held = tonumber(ARGV[3])
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. id) == 1 then
    held = held + 1
  else
    redis.call('SREM', KEYS[1], id)
  end
end
if held >= tonumber(ARGV[2]) then return held end
redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[5])
redis.call('SADD', KEYS[1], ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return -1
"""


class RevocationDeferred(ServiceUnavailable):
    """The session store (Redis) is unreachable: the session is refused here at once and revoked
    everywhere as soon as Redis is back, but that could not be done now."""

    code = "session_revocation_deferred"


class SessionInfo(BaseModel):
    id: str
    user_id: uuid.UUID
    created_at: datetime
    last_seen_at: datetime
    user_agent: str | None = None
    api_key_id: uuid.UUID | None = None  # the key it was made from (directly or via another session)


class _Stored(SessionInfo):
    secret_hash: str
    key_hash: str | None = None


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
        max_per_user: int = 20,
        clock: Clock = utcnow,
    ) -> None:
        self._backend = backend
        # Sessions made while Redis is unreachable live in this process until it is back.
        self._fallback = fallback
        self.ttl_seconds = ttl_seconds
        self.max_per_user = max_per_user
        self._clock = clock
        # Revocations that could not reach Redis: (user, session id), refused here until replayed.
        self._pending: set[tuple[uuid.UUID, str]] = set()
        self._redis = backend if isinstance(backend, RedisBackend) else None
        self._create = self._redis.client.register_script(_CREATE) if self._redis is not None else None

    async def _with_fallback(self, operation: Callable[[CacheBackend], Awaitable[T]]) -> T:
        try:
            return await operation(self._backend)
        except CacheUnavailable:
            if self._fallback is None:
                raise
            return await operation(self._fallback)

    async def create(
        self,
        user_id: uuid.UUID,
        *,
        user_agent: str | None = None,
        api_key_id: uuid.UUID | None = None,
        key_hash: str | None = None,
    ) -> tuple[str, SessionInfo]:
        """Raises Conflict (409 `too_many_sessions`) when the user already has SESSIONS_MAX_PER_USER."""
        session_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(24)
        now = self._clock()
        stored = _Stored(
            id=session_id,
            user_id=user_id,
            created_at=now,
            last_seen_at=now,
            user_agent=(user_agent or "")[:200] or None,
            api_key_id=api_key_id,
            secret_hash=_hash(secret),
            key_hash=key_hash,
        )

        value = stored.model_dump_json().encode()

        async def write(backend: CacheBackend) -> int:
            """Store the session unless the user holds the cap already: -1, or the number held."""
            redis, script = self._redis, self._create
            if redis is not None and script is not None and backend is redis:
                # Sessions made during an outage live in process and count too.
                elsewhere = len(await self._live(self._fallback, user_id)) if self._fallback is not None else 0
                index, key = keys.session_index(user_id), keys.session(user_id, session_id)
                ttl_ms = int(self.ttl_seconds * 1000)
                args = [keys.session_prefix(user_id), self.max_per_user, elsewhere, value, ttl_ms, session_id]
                return int(await redis.run(lambda: script(keys=[index, key], args=args)))
            # In process (Redis off, or down): the in-process store never yields to the event loop,
            # so nothing runs between this count and the write.
            held = len(await self._live(backend, user_id))
            if held >= self.max_per_user:
                return held
            await backend.set(keys.session(user_id, session_id), value, self.ttl_seconds)
            await backend.sadd(keys.session_index(user_id), session_id, self.ttl_seconds)
            return -1

        held = await self._with_fallback(write)
        if held >= 0:
            raise Conflict(
                f"You already have {held} sessions (SESSIONS_MAX_PER_USER={self.max_per_user}); sign out of one "
                "(DELETE /v1/sessions/{id}) or wait for one to expire.",
                code="too_many_sessions",
            )
        token = f"{TOKEN_PREFIX}{user_id.hex}.{session_id}.{secret}"
        return token, SessionInfo(**stored.model_dump(exclude={"secret_hash", "key_hash"}))

    async def authenticate(self, token: str) -> SessionInfo | None:
        """The session for `token` (sliding its expiry), or None if unknown, expired or revoked."""
        found = await self.authenticate_with_key(token)
        return found[0] if found else None

    async def authenticate_with_key(self, token: str) -> tuple[SessionInfo, str | None] | None:
        """Like `authenticate`, with the hash of the API key the session was made from (None for a
        session made before sessions remembered their key): the caller checks that key is active."""
        parsed = parse_token(token)
        if parsed is None:
            return None
        user_id, session_id, secret = parsed
        if self._pending:
            await self.replay_pending()
            if (user_id, session_id) in self._pending:
                return None  # revoked while Redis was unreachable; Redis may still hold it
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
        return SessionInfo(**stored.model_dump(exclude={"secret_hash", "key_hash"})), stored.key_hash

    async def _live(self, backend: CacheBackend, user_id: uuid.UUID) -> list[SessionInfo]:
        """The user's sessions in `backend` that have not expired (tidying the index of the others)."""
        ids: list[str] = sorted(await backend.smembers(keys.session_index(user_id)))
        values = await backend.mget([keys.session(user_id, i) for i in ids])
        sessions = []
        for session_id, data in zip(ids, values, strict=True):
            if data is None:
                await backend.srem(keys.session_index(user_id), session_id)  # expired: tidy the index
                continue
            stored = orjson.loads(data)
            stored.pop("secret_hash", None)
            stored.pop("key_hash", None)
            if (user_id, stored.get("id")) in self._pending:
                continue
            sessions.append(SessionInfo.model_validate(stored))
        return sessions

    async def list(self, user_id: uuid.UUID) -> list[SessionInfo]:
        async def read(backend: CacheBackend) -> list[SessionInfo]:
            return await self._live(backend, user_id)

        found = {session.id: session for session in await self._with_fallback(read)}
        if self._fallback is not None:
            # Sessions made while Redis was unreachable still authenticate, so they are listed too.
            for session in await self._live(self._fallback, user_id):
                found.setdefault(session.id, session)
        return sorted(found.values(), key=lambda s: s.created_at)

    async def revoke(self, user_id: uuid.UUID, session_id: str) -> None:
        """Raises NotFound if the user has no such session, RevocationDeferred (503) if Redis could
        not be reached: then the session is refused here at once and revoked there once it is back."""

        async def remove(backend: CacheBackend) -> int:
            removed = await backend.delete(keys.session(user_id, session_id))
            await backend.srem(keys.session_index(user_id), session_id)
            return removed

        if self._fallback is not None and await remove(self._fallback):
            return  # made while Redis was unreachable: it only ever lived here
        if self._pending:
            await self.replay_pending()
        try:
            removed = await remove(self._backend)
        except CacheUnavailable:
            if self._fallback is None:
                raise
            self._defer(user_id, session_id)
            raise RevocationDeferred(
                "The session is signed out on this server, but the session store is unreachable right now; "
                "it will be revoked everywhere as soon as the store is back. Retry to confirm."
            ) from None
        if not removed:
            raise NotFound("No such session. List yours with GET /v1/sessions.", code="session_not_found")

    async def sign_out(self, token: str) -> bool:
        """Revoke the session `token` names, if its secret matches: False if there is none. While
        Redis is unreachable the secret cannot be checked there: the session is revoked anyway
        (deferred: RevocationDeferred), since a sign-out that quietly left it valid would be worse."""
        parsed = parse_token(token)
        if parsed is None:
            return False
        user_id, session_id, _ = parsed
        try:
            found = await self.authenticate_with_key(token)
        except CacheUnavailable:
            found = None  # no fallback: the revoke below defers nothing and raises too
        if found is None:
            if not await self._store_unreachable():
                return False
            if self._fallback is None:
                raise RevocationDeferred("The session store is unreachable right now; retry in a few seconds.")
        try:
            await self.revoke(user_id, session_id)
        except NotFound:
            return False  # revoked meanwhile, e.g. through DELETE /v1/sessions/{id}
        return True

    async def _store_unreachable(self) -> bool:
        try:
            await self._backend.get(keys.session_index(uuid.UUID(int=0)))
        except CacheUnavailable:
            return True
        return False

    async def revoke_made_with(self, user_id: uuid.UUID, api_key_id: uuid.UUID) -> int:
        """End every session of the user made from this API key (its key was revoked). Sessions this
        instance cannot reach now are refused anyway: each checks its key when used."""
        ended = 0
        for session in await self.list(user_id):
            if session.api_key_id == api_key_id:
                try:
                    await self.revoke(user_id, session.id)
                    ended += 1
                except (NotFound, RevocationDeferred):
                    pass
        return ended

    def _defer(self, user_id: uuid.UUID, session_id: str) -> None:
        if len(self._pending) >= MAX_PENDING_REVOCATIONS:
            # Never dropped (that would revive a signed-out session); past this the store is gone for
            # so long that logging loudly is all that is left to do.
            logger.error("%d session revocations waiting for the session store", len(self._pending))
        self._pending.add((user_id, session_id))
        logger.warning("session revocation deferred until Redis is reachable (%d pending)", len(self._pending))

    @property
    def pending_revocations(self) -> int:
        return len(self._pending)

    async def replay_pending(self) -> None:
        """Apply revocations that could not reach Redis. Each stays pending (and refused) until done."""
        replayed = 0
        for user_id, session_id in list(self._pending):
            try:
                await self._backend.delete(keys.session(user_id, session_id))
                await self._backend.srem(keys.session_index(user_id), session_id)
            except CacheUnavailable:
                break
            self._pending.discard((user_id, session_id))
            replayed += 1
        if replayed:
            logger.info("replayed %d deferred session revocations", replayed)
