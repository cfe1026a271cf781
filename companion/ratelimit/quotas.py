"""Per-user token quotas, daily and monthly (UTC calendar windows), checked before generation and
charged as a reply is made, so that neither a client that leaves nor a model that fails can skip it.

A turn is admitted when its prompt fits in what is left of every window; replies then overrun a
quota by at most one reply's max_tokens, however many generate at once, on however many instances:
- before anything is stored, `enforce` refuses (429) a turn whose message alone no longer fits;
- once its prompt is built (and counted), `admit` checks that the prompt fits beside everything
  already charged or reserved and reserves the prompt plus max_tokens, in one atomic step (one
  script on Redis, for every window at once); refused, the turn withdraws what it stored;
- when the reply settles, whatever way it ends, `adjust` trues the reservation up to the real usage.
Every admitted turn saw the reservations of the turns admitted before it, so the counter never
passes the quota by more than the last one's max_tokens (given usage within its reservation: the
prompt as estimated, at most max_tokens generated).

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
from typing import TypeVar

from sqlalchemy import func, select

from companion.cache import keys
from companion.cache.backend import CacheBackend, CacheUnavailable
from companion.cache.redis import RedisBackend
from companion.ratelimit.policy import RateLimited
from companion.storage.database import Database
from companion.storage.models import Conversation, Message
from companion.types import Clock, utcnow

T = TypeVar("T")

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

# KEYS: one counter per window. ARGV[1]: the prompt, ARGV[2]: what to reserve (prompt + max_tokens),
# then per window i: ARGV[3i] quota, ARGV[3i+1] total from the database (or -1: "ask me first"),
# ARGV[3i+2] ttl ms. Returns {0} (reserved in every window), {-1} (ask the database first), or
# {-2, i, used} (window i has no room for the prompt: nothing reserved).
_ADMIT = """
local prompt, reserve = tonumber(ARGV[1]), tonumber(ARGV[2])
local used = {}
for i, key in ipairs(KEYS) do
  local value = redis.call('GET', key)
  if not value then
    if ARGV[3 * i + 1] == '-1' then return {-1} end
    value = ARGV[3 * i + 1]
  end
  used[i] = tonumber(value)
end
for i = 1, #KEYS do
  if used[i] + prompt > tonumber(ARGV[3 * i]) then
    for j, key in ipairs(KEYS) do redis.call('SET', key, used[j], 'PX', ARGV[3 * j + 2]) end
    return {-2, i, used[i]}
  end
end
for i, key in ipairs(KEYS) do redis.call('SET', key, used[i] + reserve, 'PX', ARGV[3 * i + 2]) end
return {0}
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
        self._admit = self._redis.client.register_script(_ADMIT) if self._redis is not None else None
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

    async def _with_backend(self, operation: Callable[[CacheBackend], Awaitable[T]]) -> T:
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

    async def check(self, user_id: uuid.UUID, tokens: int = 1) -> QuotaState | None:
        """The first window without room for `tokens` more, or None when generation may go ahead."""
        if not self.enabled:
            return None
        for state in await self.usage(user_id):
            if state.used + tokens > state.window.quota:
                return state
        return None

    async def enforce(self, user_id: uuid.UUID, tokens: int = 1) -> None:
        """Raise RateLimited (429 `token_quota_exceeded`, Retry-After until the window renews, on
        this service's clock) when a window has no room for `tokens` more (by default: is used up).
        Before anything is stored, with what a turn needs at least (its message); reserves nothing."""
        exceeded = await self.check(user_id, tokens)
        if exceeded is None:
            return
        raise self._exceeded(exceeded.window, exceeded.used, tokens)

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

    async def admit(self, user_id: uuid.UUID, prompt_tokens: int, max_tokens: int) -> int:
        """Reserve a turn's prompt and max_tokens in every window, atomically, when the prompt fits in
        what is left of each (beside what is charged and reserved already); returns what was reserved
        (0 without quotas). Raises RateLimited (429 `token_quota_exceeded`, nothing reserved)
        otherwise. True the reservation up to the real usage with `adjust` when the reply settles."""
        if not self.enabled:
            return 0
        now = self._clock()
        spans = [
            (w, self._key(user_id, w), int(((w.end - now).total_seconds() + 3600) * 1000))
            for w in windows(now, self.daily, self.monthly)
        ]
        reserve = prompt_tokens + max_tokens

        async def take(backend: CacheBackend) -> tuple[int, int]:
            """(-1, 0) when reserved, else (the index of the window without room, its usage)."""
            redis, script = self._redis, self._admit
            if redis is not None and script is not None and backend is redis:
                counters = [key for _, key, _ in spans]
                args: list[int] = [prompt_tokens, reserve]
                for window, _, ttl_ms in spans:
                    args += [window.quota, -1, ttl_ms]
                result = [int(v) for v in await redis.run(lambda: script(keys=counters, args=args))]
                if result[0] == -1:  # a counter is missing: rebuild it from the stored usage
                    for index, (window, _, _) in enumerate(spans):
                        args[3 * index + 3] = await self._used_in_database(user_id, window)
                    result = [int(v) for v in await redis.run(lambda: script(keys=counters, args=args))]
                return (-1, 0) if result[0] == 0 else (result[1] - 1, result[2])
            # In process (Redis off, or down): the database reads come first; from the first read of
            # a counter to the last write the in-process store never yields to the event loop, so it
            # is as atomic as the script. A rebuild only creates a counter still missing.
            for window, key, ttl_ms in spans:
                if await backend.get(key) is None:
                    total = await self._used_in_database(user_id, window)
                    await backend.add(key, str(total).encode(), ttl_ms / 1000)
            used = [int(await backend.get(key) or 0) for _, key, _ in spans]
            for index, (window, _, _) in enumerate(spans):
                if used[index] + prompt_tokens > window.quota:
                    return index, used[index]
            for (_, key, ttl_ms), value in zip(spans, used, strict=True):
                await backend.set(key, str(value + reserve).encode(), ttl_ms / 1000)
            return -1, 0

        refused, used = await self._with_backend(take)
        if refused >= 0:
            raise self._exceeded(spans[refused][0], used, prompt_tokens)
        return reserve

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

    def _exceeded(self, window: Window, used: int, needed: int) -> RateLimited:
        if used >= window.quota or needed <= 1:
            what = "is used up"
        else:
            what = f"has {window.quota - used} tokens left, fewer than this turn needs ({needed})"
        return RateLimited(
            f"Your {window.name} token quota ({window.quota} tokens) {what}; it renews at {window.end.isoformat()}.",
            retry_after=max((window.end - self._clock()).total_seconds(), 1.0),
            code="token_quota_exceeded",
        )

    async def reset(self, user_id: uuid.UUID) -> None:
        for window in windows(self._clock(), self.daily, self.monthly):
            key = self._key(user_id, window)

            async def delete(backend: CacheBackend, key: str = key) -> int:
                return await backend.delete(key)

            await self._with_backend(delete)
