"""Request-rate limiting with GCRA (the generic cell rate algorithm), atomic in one round trip.

GCRA keeps one number per key, the theoretical arrival time (TAT) of the next request; a request is
admitted when `TAT - burst <= now`, and then moves TAT on by one emission interval (period / limit).
With burst = limit, exactly `limit` requests fit in any fresh window, and they come back smoothly.
There is no counter and no separate EXPIRE (DESIGN-NOTES #1): on Redis the whole check is one Lua
script that reads Redis's own clock (`TIME`, so instances with skewed clocks agree) and sets the key
with its expiry in the same command. The in-process limiter runs the same arithmetic on an
injected clock; both pass one contract suite.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from redis.exceptions import NoScriptError

from companion.cache.redis import RedisBackend

MICROS = 1_000_000


@dataclass(frozen=True, slots=True)
class Limit:
    """`limit` requests per `period_seconds`, named for headers and metrics."""

    name: str
    limit: int
    period_seconds: float

    @property
    def emission_us(self) -> int:
        return max(int(self.period_seconds * MICROS / self.limit), 1)


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    limit: Limit
    remaining: int
    retry_after_seconds: float  # 0 when allowed
    reset_seconds: float  # until the full quota is available again


class RateLimiter(Protocol):
    async def hit(self, key: str, limit: Limit, cost: int = 1) -> Decision:
        """Admit or refuse one request (of `cost` units) for `key`. Raises CacheUnavailable (Redis)."""
        ...

    async def peek(self, key: str, limit: Limit) -> Decision:
        """The state without spending anything."""
        ...

    async def reset(self, key: str) -> None: ...


def _decide(limit: Limit, tat: int, now: int, cost: int) -> tuple[Decision, int | None]:
    """The GCRA step shared by both implementations. Returns the decision and the new TAT to store
    (None when refused)."""
    emission = limit.emission_us
    burst = emission * limit.limit
    tat = max(tat, now)
    new_tat = tat + emission * cost
    allow_at = new_tat - burst
    if allow_at > now:
        remaining = max((now + burst - tat) // emission, 0)
        return Decision(False, limit, int(remaining), (allow_at - now) / MICROS, (tat - now) / MICROS), None
    remaining = (now + burst - new_tat) // emission
    return Decision(True, limit, int(remaining), 0.0, (new_tat - now) / MICROS), new_tat


# KEYS[1]: the key. ARGV: emission interval (µs), limit, cost, peek (0/1).
# Returns {allowed, remaining, retry_after_us, reset_us}.
_GCRA = """
local emission = tonumber(ARGV[1])
local burst = emission * tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + emission * cost
local allow_at = new_tat - burst
if ARGV[4] == '1' then
  return {1, math.floor((now + burst - tat) / emission), 0, tat - now}
end
if allow_at > now then
  return {0, math.max(math.floor((now + burst - tat) / emission), 0), allow_at - now, tat - now}
end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, math.floor((now + burst - new_tat) / emission), 0, new_tat - now}
"""


class RedisRateLimiter:
    def __init__(self, backend: RedisBackend) -> None:
        self._backend = backend
        self._script = backend.client.register_script(_GCRA)

    async def _run(self, key: str, limit: Limit, cost: int, peek: bool) -> Decision:
        args = (limit.emission_us, limit.limit, cost, "1" if peek else "0")

        async def call() -> Any:
            # EVALSHA itself: redis-py's Script.__call__ costs ~4 µs of CPU more per check (it
            # imports inside the call). Loading on NoScriptError is what it would do.
            client = self._backend.client
            try:
                return await client.evalsha(self._script.sha, 1, key, *args)
            except NoScriptError:
                await client.script_load(self._script.script)
                return await client.evalsha(self._script.sha, 1, key, *args)

        allowed, remaining, retry_us, reset_us = await self._backend.run(call)
        return Decision(bool(allowed), limit, int(remaining), int(retry_us) / MICROS, int(reset_us) / MICROS)

    async def hit(self, key: str, limit: Limit, cost: int = 1) -> Decision:
        return await self._run(key, limit, cost, peek=False)

    async def peek(self, key: str, limit: Limit) -> Decision:
        return await self._run(key, limit, 1, peek=True)

    async def reset(self, key: str) -> None:
        await self._backend.delete(key)


class MemoryRateLimiter:
    """GCRA in process: used when Redis is off, and as the fallback while it is unreachable."""

    def __init__(self, *, clock: Callable[[], float] = time.time, max_keys: int = 100_000) -> None:
        self._clock = clock
        self._tats: OrderedDict[str, int] = OrderedDict()
        self._max_keys = max_keys

    def _now(self) -> int:
        return int(self._clock() * MICROS)

    async def hit(self, key: str, limit: Limit, cost: int = 1) -> Decision:
        now = self._now()
        decision, new_tat = _decide(limit, self._tats.get(key, now), now, cost)
        if new_tat is not None:
            self._tats[key] = new_tat
            self._tats.move_to_end(key)
            self._evict(now)
        return decision

    async def peek(self, key: str, limit: Limit) -> Decision:
        now = self._now()
        tat = max(self._tats.get(key, now), now)
        emission = limit.emission_us
        remaining = (now + emission * limit.limit - tat) // emission
        return Decision(True, limit, int(remaining), 0.0, (tat - now) / MICROS)

    async def reset(self, key: str) -> None:
        self._tats.pop(key, None)

    def _evict(self, now: int) -> None:
        # Keys whose TAT has passed hold no state (a fresh key behaves the same): the "expiry".
        while len(self._tats) > self._max_keys:
            self._tats.popitem(last=False)
        oldest = next(iter(self._tats.items()), None)
        if oldest is not None and oldest[1] <= now:
            self._tats.pop(oldest[0])


def retry_after_header(seconds: float) -> str:
    return str(max(math.ceil(seconds), 1))
