"""Per-user token quotas, daily and monthly (UTC calendar windows), checked before generation and
charged with the real usage after it.

The counters live in Redis (or in process) as a cache of the database's truth: token usage is stored
on every reply, so a counter that is missing (a new window, a flush, a restart) is rebuilt from the
sum of the user's stored usage in that window before it is used. Charging is one atomic script
(create-if-missing from that base, INCRBY, expiry in the same step). Several replies generating at
once for one user may together overrun the quota by at most their own size: the check is before
generation, the charge after.
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
        window = exceeded.window
        raise RateLimited(
            f"Your {window.name} token quota ({window.quota} tokens) is used up; it renews at "
            f"{window.end.isoformat()}.",
            retry_after=max((window.end - self._clock()).total_seconds(), 1.0),
            code="token_quota_exceeded",
        )

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

    async def reset(self, user_id: uuid.UUID) -> None:
        for window in windows(self._clock(), self.daily, self.monthly):
            key = self._key(user_id, window)

            async def delete(backend: CacheBackend, key: str = key) -> int:
                return await backend.delete(key)

            await self._with_backend(delete)
