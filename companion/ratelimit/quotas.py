"""Per-user token quotas, daily and monthly (UTC calendar windows), checked before generation and
charged as a reply is made, so that neither a client that leaves nor a model that fails can skip it.

A turn reserves its worst case before anything is stored (`reserve`: the prompt budget plus its
max_tokens, refused with 429 when a window is used up), trues that up to its real prompt when
generation starts, and to its real usage when it settles (`adjust`), whatever way it ends. Several
replies of one user generating at once therefore see each other's reservations: together they
overrun a quota by at most one reply (the last one admitted).

The counters live in Redis (or in process) as a cache of the database's truth: token usage is stored
on every reply, so a counter that is missing (a new window, a flush, a restart) is rebuilt from the
sum of the user's stored usage in that window before it is used. Charging is one atomic script
(create-if-missing from that base, INCRBY, expiry in the same step).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select

from companion.cache import keys
from companion.cache.backend import CacheBackend, CacheUnavailable
from companion.cache.redis import RedisBackend
from companion.ratelimit.policy import RateLimited
from companion.storage.database import Database
from companion.storage.models import Conversation, Message
from companion.types import Clock, utcnow

# KEYS[1]: counter. ARGV: tokens, total from the database (or -1: "ask me first"), ttl ms.
_CHARGE = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  if ARGV[2] == '-1' then return -1 end
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return tonumber(ARGV[2])
end
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return value
"""

# KEYS[1]: counter. ARGV: tokens, total from the database (or -1: "ask me first"), ttl ms, quota.
# Returns -1 (ask the database first), -2 (used up: refused, nothing reserved), or the new value.
_RESERVE = """
local value = redis.call('GET', KEYS[1])
if not value then
  if ARGV[2] == '-1' then return -1 end
  value = ARGV[2]
end
if tonumber(value) >= tonumber(ARGV[4]) then
  redis.call('SET', KEYS[1], value, 'PX', ARGV[3])
  return -2
end
local reserved = tonumber(value) + tonumber(ARGV[1])
redis.call('SET', KEYS[1], reserved, 'PX', ARGV[3])
return reserved
"""

# KEYS[1]: counter. ARGV: delta (may be negative). A missing counter is left missing: it is rebuilt
# from the database (which holds every settled reply) when next read.
_ADJUST = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
return redis.call('INCRBY', KEYS[1], ARGV[1])
"""


@dataclass(frozen=True, slots=True)
class Window:
    name: str  # "daily" | "monthly"
    quota: int
    start: datetime
    end: datetime

    @property
    def label(self) -> str:
        return self.start.strftime("%Y%m%d" if self.name == "daily" else "%Y%m")


@dataclass(frozen=True, slots=True)
class QuotaState:
    window: Window
    used: int

    @property
    def remaining(self) -> int:
        return max(self.window.quota - self.used, 0)

    @property
    def exceeded(self) -> bool:
        return self.used >= self.window.quota


def windows(now: datetime, daily: int, monthly: int) -> list[Window]:
    day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    month = day.replace(day=1)
    next_month = (month + timedelta(days=32)).replace(day=1)
    result = []
    if daily > 0:
        result.append(Window("daily", daily, day, day + timedelta(days=1)))
    if monthly > 0:
        result.append(Window("monthly", monthly, month, next_month))
    return result


class TokenQuotas:
    def __init__(
        self,
        database: Database,
        backend: CacheBackend,
        *,
        daily: int = 0,
        monthly: int = 0,
        fallback: CacheBackend | None = None,
        clock: Clock = utcnow,
    ) -> None:
        self._db = database
        self._backend = backend
        self._fallback = fallback
        self.daily = daily
        self.monthly = monthly
        self._clock = clock
        self._redis = backend if isinstance(backend, RedisBackend) else None
        self._charge = self._redis.client.register_script(_CHARGE) if self._redis is not None else None
        self._reserve = self._redis.client.register_script(_RESERVE) if self._redis is not None else None
        self._adjust = self._redis.client.register_script(_ADJUST) if self._redis is not None else None

    @property
    def enabled(self) -> bool:
        return self.daily > 0 or self.monthly > 0

    def _key(self, user_id: uuid.UUID, window: Window) -> str:
        return keys.token_quota(user_id, window.name, window.label)

    async def _used_in_database(self, user_id: uuid.UUID, window: Window) -> int:
        async with self._db.session() as session:
            total = (
                await session.execute(
                    select(func.coalesce(func.sum(Message.prompt_tokens + Message.completion_tokens), 0))
                    .join(Conversation, Conversation.id == Message.conversation_id)
                    .where(
                        Conversation.user_id == user_id,
                        Message.role == "assistant",
                        Message.created_at >= window.start,
                        Message.created_at < window.end,
                    )
                )
            ).scalar_one()
        return int(total or 0)

    async def _with_backend(self, operation: Callable[[CacheBackend], Awaitable[int]]) -> int:
        try:
            return await operation(self._backend)
        except CacheUnavailable:
            if self._fallback is None:
                raise
            return await operation(self._fallback)

    async def usage(self, user_id: uuid.UUID) -> list[QuotaState]:
        """Each window's usage so far (rebuilding a missing counter from the database)."""
        states = []
        for window in windows(self._clock(), self.daily, self.monthly):
            key = self._key(user_id, window)

            async def read(backend: CacheBackend, key: str = key, window: Window = window) -> int:
                data = await backend.get(key)
                if data is not None:
                    return int(data)
                used = await self._used_in_database(user_id, window)
                ttl = (window.end - self._clock()).total_seconds() + 3600
                await backend.add(key, str(used).encode(), ttl)
                return int(await backend.get(key) or used)

            states.append(QuotaState(window, await self._with_backend(read)))
        return states

    async def check(self, user_id: uuid.UUID) -> QuotaState | None:
        """The first exceeded window, or None when generation may go ahead."""
        if not self.enabled:
            return None
        for state in await self.usage(user_id):
            if state.exceeded:
                return state
        return None

    async def enforce(self, user_id: uuid.UUID) -> None:
        """Raise RateLimited (429 `token_quota_exceeded`, Retry-After until the window renews, on
        this service's clock) when a window is used up; for callers that must refuse before they
        store anything (the OpenAI route, which may create a conversation first)."""
        exceeded = await self.check(user_id)
        if exceeded is None:
            return
        raise self._exceeded(exceeded.window)

    async def charge(self, user_id: uuid.UUID, tokens: int) -> None:
        """Add a stored reply's real token usage to every window (call after the reply is saved:
        a counter rebuilt from the database then already includes it)."""
        if not self.enabled or tokens <= 0:
            return
        for window in windows(self._clock(), self.daily, self.monthly):
            key = self._key(user_id, window)
            ttl_ms = int(((window.end - self._clock()).total_seconds() + 3600) * 1000)

            async def add(backend: CacheBackend, key: str = key, window: Window = window, ttl_ms: int = ttl_ms) -> int:
                redis, script = self._redis, self._charge
                if redis is not None and script is not None and backend is redis:
                    value = int(await redis.run(lambda: script(keys=[key], args=[tokens, -1, ttl_ms])))
                    if value == -1:
                        total = await self._used_in_database(user_id, window)
                        value = int(await redis.run(lambda: script(keys=[key], args=[tokens, total, ttl_ms])))
                    return value
                current = await backend.get(key)
                if current is None:
                    value = await self._used_in_database(user_id, window)
                else:
                    value = int(current) + tokens
                await backend.set(key, str(value).encode(), ttl_ms / 1000)
                return value

            await self._with_backend(add)

    async def reserve(self, user_id: uuid.UUID, tokens: int) -> None:
        """Reserve `tokens` in every window, atomically refusing (RateLimited 429
        `token_quota_exceeded`, nothing reserved) when one is used up. Call before storing anything;
        true it up later with `adjust`."""
        if not self.enabled:
            return
        done: list[Window] = []
        for window in windows(self._clock(), self.daily, self.monthly):
            key = self._key(user_id, window)
            ttl_ms = int(((window.end - self._clock()).total_seconds() + 3600) * 1000)

            async def take(backend: CacheBackend, key: str = key, window: Window = window, ttl_ms: int = ttl_ms) -> int:
                redis, script = self._redis, self._reserve
                if redis is not None and script is not None and backend is redis:
                    args = [tokens, -1, ttl_ms, window.quota]
                    value = int(await redis.run(lambda: script(keys=[key], args=args)))
                    if value == -1:
                        args[1] = await self._used_in_database(user_id, window)
                        value = int(await redis.run(lambda: script(keys=[key], args=args)))
                    return value
                # In process (Redis off, or down): no await between the read and the write below,
                # so it is as atomic as the script; a rebuild only creates a counter still missing.
                if await backend.get(key) is None:
                    total = await self._used_in_database(user_id, window)
                    await backend.add(key, str(total).encode(), ttl_ms / 1000)
                used = int(await backend.get(key) or 0)
                if used >= window.quota:
                    return -2
                await backend.set(key, str(used + tokens).encode(), ttl_ms / 1000)
                return used + tokens

            if await self._with_backend(take) == -2:
                for earlier in done:  # give back what the windows before this one reserved
                    await self._adjust_window(user_id, earlier, -tokens)
                raise self._exceeded(window)
            done.append(window)

    async def adjust(self, user_id: uuid.UUID, delta: int) -> None:
        """Add `delta` (negative: give back) to every window's existing counter: a reservation trued
        up to what was really used. A missing counter stays missing (rebuilt from the database)."""
        if not self.enabled or delta == 0:
            return
        for window in windows(self._clock(), self.daily, self.monthly):
            await self._adjust_window(user_id, window, delta)

    async def _adjust_window(self, user_id: uuid.UUID, window: Window, delta: int) -> None:
        key = self._key(user_id, window)

        async def add(backend: CacheBackend) -> int:
            redis, script = self._redis, self._adjust
            if redis is not None and script is not None and backend is redis:
                return int(await redis.run(lambda: script(keys=[key], args=[delta])))
            current = await backend.get(key)
            if current is None:
                return 0
            await backend.set(
                key, str(int(current) + delta).encode(), (window.end - self._clock()).total_seconds() + 3600
            )
            return int(current) + delta

        await self._with_backend(add)

    def _exceeded(self, window: Window) -> RateLimited:
        return RateLimited(
            f"Your {window.name} token quota ({window.quota} tokens) is used up; it renews at "
            f"{window.end.isoformat()}.",
            retry_after=max((window.end - self._clock()).total_seconds(), 1.0),
            code="token_quota_exceeded",
        )

    async def reset(self, user_id: uuid.UUID) -> None:
        for window in windows(self._clock(), self.daily, self.monthly):
            key = self._key(user_id, window)

            async def delete(backend: CacheBackend, key: str = key) -> int:
                return await backend.delete(key)

            await self._with_backend(delete)
