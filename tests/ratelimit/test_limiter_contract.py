"""One contract for both GCRA limiters: `RedisRateLimiter` on a private redis-server (real time,
Redis's own clock) and `MemoryRateLimiter` on a fake clock. Whatever one promises, the other keeps:
exactly `limit` admitted in a fresh window, refusals that say when to come back, one more cell per
emission interval, a countdown in `remaining`, costs above one, peeks that spend nothing, resets.
Redis-only: every key it writes expires with the window, and the decision is taken on Redis's clock,
never the Python process's."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis

from companion.ratelimit.limiter import MICROS, Decision, Limit, MemoryRateLimiter, RateLimiter, RedisRateLimiter
from tests.ratelimit.conftest import FakeClock
from tests.support.live import wait_for
from tests.support.redis_topologies import TOPOLOGIES, backend_on, contract_backend, prepared_topology

DEADLINE = 10.0


@dataclass
class LimiterCase:
    """One limiter under test. Memory runs on `clock`; Redis on real time, so the tests that need
    time to pass use a short period there and wait on the outcome with a deadline."""

    name: str
    limiter: RateLimiter
    clock: FakeClock | None = None
    redis: aioredis.Redis | None = None

    @property
    def is_redis(self) -> bool:
        return self.redis is not None

    async def hits(self, key: str, limit: Limit, count: int, cost: int = 1) -> list[Decision]:
        return [await self.limiter.hit(key, limit, cost) for _ in range(count)]

    async def admitted_after_waiting(self, key: str, limit: Limit, refused: Decision) -> Decision:
        """Let the refusal's retry_after pass, then return the first decision that admits."""
        if self.clock is not None:
            self.clock.advance(refused.retry_after_seconds)
            return await self.limiter.hit(key, limit)
        admitted: list[Decision] = []

        async def admits() -> bool:
            decision = await self.limiter.hit(key, limit)
            if decision.allowed:
                admitted.append(decision)
            return decision.allowed

        await wait_for(admits, timeout=DEADLINE, what="the limiter to admit one more")
        return admitted[0]


@pytest.fixture(params=["redis", "memory", *TOPOLOGIES])
async def case(request: pytest.FixtureRequest) -> AsyncIterator[LimiterCase]:
    if request.param == "memory":
        clock = FakeClock()
        yield LimiterCase("memory", MemoryRateLimiter(clock=clock), clock=clock)
        return
    if request.param in TOPOLOGIES:
        on_topology = backend_on(request.param, request)
        inspector = prepared_topology(request.param, request)
        try:
            yield LimiterCase("redis", RedisRateLimiter(on_topology), redis=inspector.client)
        finally:
            await on_topology.aclose()
            await inspector.aclose()
        return
    url: str = request.getfixturevalue("redis_url")
    backend = contract_backend(url)
    raw = aioredis.Redis.from_url(url)
    try:
        yield LimiterCase("redis", RedisRateLimiter(backend), redis=raw)
    finally:
        await backend.aclose()
        await raw.aclose()


def new_key() -> str:
    return f"companion:v1:{{r:test}}:rl:{uuid.uuid4().hex}"


LIMIT = Limit("user", 5, 60)  # 12 s per cell: nothing refills during a test on real time
SHORT = Limit("user", 5, 2.0)  # 400 ms per cell: Redis tests that need time to pass


async def test_exactly_the_limit_is_admitted_in_a_fresh_window(case: LimiterCase):
    key = new_key()
    decisions = await case.hits(key, LIMIT, 40)
    assert [d.allowed for d in decisions] == [True] * 5 + [False] * 35
    # Concurrent hits on another key: still exactly the limit (one atomic step each).
    other = new_key()
    concurrent = await asyncio.gather(*(case.limiter.hit(other, LIMIT) for _ in range(40)))
    assert sum(d.allowed for d in concurrent) == 5


async def test_a_refusal_says_when_to_come_back(case: LimiterCase):
    key = new_key()
    await case.hits(key, LIMIT, 5)
    refused = await case.limiter.hit(key, LIMIT)
    assert refused.allowed is False
    assert refused.remaining == 0
    emission = LIMIT.period_seconds / LIMIT.limit
    assert 0 < refused.retry_after_seconds <= emission
    # The whole burst comes back within one period.
    assert 0 < refused.reset_seconds <= LIMIT.period_seconds
    assert refused.limit is LIMIT


async def test_one_more_is_admitted_after_the_emission_interval(case: LimiterCase):
    limit = SHORT if case.is_redis else LIMIT
    key = new_key()
    assert all(d.allowed for d in await case.hits(key, limit, 5))
    refused = await case.limiter.hit(key, limit)
    assert not refused.allowed and refused.retry_after_seconds > 0
    again = await case.admitted_after_waiting(key, limit, refused)
    # One cell came back, not the whole burst.
    assert again.allowed and again.remaining == 0
    if case.clock is not None:
        assert not (await case.limiter.hit(key, limit)).allowed
        case.clock.advance(limit.period_seconds)
        assert [d.allowed for d in await case.hits(key, limit, 6)] == [True] * 5 + [False]


async def test_remaining_counts_down(case: LimiterCase):
    key = new_key()
    decisions = await case.hits(key, LIMIT, 6)
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0, 0]
    # reset_seconds grows by one emission interval per admitted request.
    resets = [d.reset_seconds for d in decisions[:5]]
    assert resets == sorted(resets) and resets[-1] <= LIMIT.period_seconds


async def test_a_request_may_cost_more_than_one(case: LimiterCase):
    key = new_key()
    first = await case.limiter.hit(key, LIMIT, cost=3)
    assert first.allowed and first.remaining == 2
    too_big = await case.limiter.hit(key, LIMIT, cost=3)
    assert not too_big.allowed and too_big.remaining == 2
    assert 0 < too_big.retry_after_seconds <= LIMIT.period_seconds / LIMIT.limit
    last = await case.limiter.hit(key, LIMIT, cost=2)
    assert last.allowed and last.remaining == 0
    # More than the whole burst is never admitted, even on a fresh key.
    never = await case.limiter.hit(new_key(), LIMIT, cost=6)
    assert not never.allowed


async def test_peek_spends_nothing(case: LimiterCase):
    key = new_key()
    fresh = await case.limiter.peek(key, LIMIT)
    assert fresh.remaining == 5 and fresh.reset_seconds == 0
    await case.limiter.hit(key, LIMIT)
    for _ in range(3):
        assert (await case.limiter.peek(key, LIMIT)).remaining == 4
    assert (await case.limiter.hit(key, LIMIT)).remaining == 3
    if case.redis is not None:
        assert await case.redis.exists(new_key()) == 0  # peeking a fresh key writes nothing
        await case.limiter.peek(other := new_key(), LIMIT)
        assert await case.redis.exists(other) == 0


async def test_reset_clears_the_key(case: LimiterCase):
    key = new_key()
    await case.hits(key, LIMIT, 5)
    assert not (await case.limiter.hit(key, LIMIT)).allowed
    await case.limiter.reset(key)
    assert (await case.limiter.peek(key, LIMIT)).remaining == 5
    assert (await case.limiter.hit(key, LIMIT)).remaining == 4
    await case.limiter.reset(new_key())  # resetting an unknown key is fine


async def test_keys_and_limits_are_independent(case: LimiterCase):
    a, b = new_key(), new_key()
    await case.hits(a, LIMIT, 5)
    assert not (await case.limiter.hit(a, LIMIT)).allowed
    assert (await case.limiter.hit(b, LIMIT)).remaining == 4
    wide = Limit("wide", 100, 60)
    assert (await case.limiter.hit(new_key(), wide)).remaining == 99


# --- Redis only ----------------------------------------------------------------------------------


@pytest.fixture
async def redis_case(redis_url: str) -> AsyncIterator[LimiterCase]:
    backend = contract_backend(redis_url)
    raw = aioredis.Redis.from_url(redis_url)
    try:
        yield LimiterCase("redis", RedisRateLimiter(backend), redis=raw)
    finally:
        await backend.aclose()
        await raw.aclose()


async def test_redis_keys_always_expire_with_their_window(redis_case: LimiterCase):
    assert redis_case.redis is not None
    key = new_key()
    for cost in (1, 1, 2, 1, 1, 3):  # admitted and refused hits alike
        decision = await redis_case.limiter.hit(key, SHORT, cost)
        pttl = await redis_case.redis.pttl(key)
        assert pttl > 0, (decision, pttl)  # never -1 (no expiry) and never -2 (gone) right after a hit
        assert pttl <= SHORT.period_seconds * 1000 + 2
    await wait_for(lambda: _gone(redis_case.redis, key), timeout=DEADLINE, what="the key to expire after its window")
    assert (await redis_case.limiter.peek(key, SHORT)).remaining == SHORT.limit


async def _gone(redis: aioredis.Redis | None, key: str) -> bool:
    assert redis is not None
    return await redis.exists(key) == 0


async def test_the_decision_uses_redis_time_not_the_process_clock(
    redis_case: LimiterCase, redis_url: str, monkeypatch: pytest.MonkeyPatch
):
    """Two limiters on separate connections, one in a process whose clock is a year ahead: they
    agree, because the script reads Redis's TIME. (With the Python clock, the skewed one would see
    a fresh window.)"""
    key, control = new_key(), new_key()
    other = contract_backend(redis_url)
    skewed = RedisRateLimiter(other)
    try:
        honest = [await redis_case.limiter.hit(key, LIMIT) for _ in range(3)]
        reference = [await redis_case.limiter.hit(control, LIMIT) for _ in range(3)]
        real_time = time.time
        monkeypatch.setattr(time, "time", lambda: real_time() + 365 * 86400)
        monkeypatch.setattr(time, "time_ns", lambda: int((real_time() + 365 * 86400) * 1e9))
        from_skewed = [await skewed.hit(key, LIMIT) for _ in range(3)]
        from_reference = [await redis_case.limiter.hit(control, LIMIT) for _ in range(3)]
    finally:
        monkeypatch.undo()
        await other.aclose()
    assert [d.remaining for d in honest + from_skewed] == [4, 3, 2, 1, 0, 0]
    assert [d.allowed for d in from_skewed] == [True, True, False]
    # Identical to the same sequence taken entirely on the honest clock.
    assert [(d.allowed, d.remaining) for d in from_skewed] == [(d.allowed, d.remaining) for d in from_reference]
    assert [(d.allowed, d.remaining) for d in honest] == [(d.allowed, d.remaining) for d in reference]
    # Times stay relative to Redis's clock: nothing a year away.
    assert all(0 <= d.reset_seconds <= LIMIT.period_seconds for d in from_skewed)
    assert 0 < from_skewed[-1].retry_after_seconds <= LIMIT.period_seconds / LIMIT.limit


async def test_memory_limiter_follows_its_injected_clock(fake_clock: FakeClock):
    """The in-process limiter has no Redis TIME: it runs on the clock it is given, and forgets a
    key once its TAT has passed."""
    limiter = MemoryRateLimiter(clock=fake_clock, max_keys=3)
    for index in range(10):
        await limiter.hit(f"k{index}", LIMIT)
    assert not (await limiter.hit("k9", LIMIT, cost=5)).allowed
    fake_clock.advance(LIMIT.emission_us / MICROS * 5)
    assert (await limiter.hit("k9", LIMIT, cost=5)).allowed
