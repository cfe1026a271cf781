"""The rate-limit check: our GCRA limiters beside the `limits` library, against one Redis.

Part of `python -m bench` (the cache group); `python -m bench.ratelimit [--quick]` still runs it on
its own and prints the markdown table, against a private redis-server it starts and stops.

Measured, each on its own keys, with the same limit (50 per minute) and the same traffic (hits cycling
over 64 subjects, so both admitted and refused decisions are taken):

- ours, Redis:    `RedisRateLimiter.hit` (GCRA, one EVALSHA, through the app's RedisBackend and breaker)
- ours, memory:   `MemoryRateLimiter.hit` (GCRA in process)
- limits, Redis:  `limits.aio` moving window and fixed window on `RedisStorage` (redis-py)
- limits, memory: `limits.aio` moving window on `MemoryStorage`
- the floor:      a bare redis-py `PING` on the same kind of client, i.e. one loopback round trip

Each hit is awaited on its own (latency, not pipelining).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench.harness import Budget, Case, Measured, compare, progress
from bench.report import Bars, Row, Section, latency_table
from companion.cache.redis import RedisBackend, make_client
from companion.ratelimit.limiter import Limit, MemoryRateLimiter, RedisRateLimiter

PER_MINUTE = 50
SUBJECTS = 64

Closer = Callable[[], Awaitable[None]]


def build_cases(url: str, prefix: str) -> tuple[list[Case], list[Closer]]:
    """The contenders, keyed: ours.redis, limits.moving.redis, limits.fixed.redis, ours.memory,
    limits.moving.memory, ping.redis."""
    from limits import RateLimitItemPerMinute
    from limits.aio.storage import MemoryStorage, RedisStorage
    from limits.aio.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter

    limit = Limit("bench", PER_MINUTE, 60)
    item = RateLimitItemPerMinute(PER_MINUTE)
    backend = RedisBackend(make_client(url, max_connections=8))
    ours_redis = RedisRateLimiter(backend)
    ours_memory = MemoryRateLimiter()
    limits_redis = RedisStorage("async+" + url, implementation="redispy", key_prefix=f"{prefix}limits")
    moving_redis = MovingWindowRateLimiter(limits_redis)
    fixed_redis = FixedWindowRateLimiter(limits_redis)
    moving_memory = MovingWindowRateLimiter(MemoryStorage("async+memory://"))

    async def close_limits() -> None:
        # The redis-py client inside limits' bridge (limits has no public close).
        client = getattr(limits_redis.bridge, "storage", None)
        if client is not None and hasattr(client, "aclose"):
            await client.aclose()

    def subject(tag: str) -> Callable[[int], str]:
        return lambda i: f"{prefix}{tag}:{i % SUBJECTS}"

    ours_key, moving_key, fixed_key, memory_key, limits_memory_key = (
        subject("ours"),
        subject("moving"),
        subject("fixed"),
        subject("ours-mem"),
        subject("moving-mem"),
    )
    cases = [
        Case("ours.redis", "ours: GCRA Lua script (Redis)", lambda i: ours_redis.hit(ours_key(i), limit)),
        Case("limits.moving.redis", "`limits`: moving window (Redis)", lambda i: moving_redis.hit(item, moving_key(i))),
        Case("limits.fixed.redis", "`limits`: fixed window (Redis)", lambda i: fixed_redis.hit(item, fixed_key(i))),
        Case("ping.redis", "floor: redis-py PING (one round trip)", lambda i: backend.client.ping()),
        Case("ours.memory", "ours: GCRA in process", lambda i: ours_memory.hit(memory_key(i), limit)),
        Case(
            "limits.moving.memory",
            "`limits`: moving window (in process)",
            lambda i: moving_memory.hit(item, limits_memory_key(i)),
        ),
    ]
    return cases, [backend.aclose, close_limits]


async def measure(url: str, budget: Budget, prefix: str = "bench:rl:") -> dict[str, Measured]:
    cases, closers = build_cases(url, prefix)
    try:
        return await compare(cases, budget, title="rate limit")
    finally:
        for close in closers:
            with contextlib.suppress(Exception):
                await close()


def section(results: dict[str, Measured]) -> Section:
    ours, moving, fixed, ping = (
        results[k] for k in ("ours.redis", "limits.moving.redis", "limits.fixed.redis", "ping.redis")
    )
    notes = {
        "ours.redis": f"{ours.ratio(moving):.2f}x `limits` moving window, {ours.ratio(ping):.2f}x a PING",
        "limits.moving.redis": f"{moving.ratio(ping):.2f}x a PING",
        "limits.fixed.redis": f"{fixed.ratio(ping):.2f}x a PING",
        "ours.memory": f"{results['ours.memory'].ratio(results['limits.moving.memory']):.2f}x `limits` in process",
    }
    rows = [Row(m.label, m.stats, notes.get(key, "")) for key, m in results.items()]
    return Section(
        title="Rate-limit check",
        intro=f"One `hit` per operation, limit {PER_MINUTE}/min over {SUBJECTS} subjects (admitted and refused "
        "decisions both taken), the same private Redis for every row. Ratios are per-round medians of p50s.",
        tables=[latency_table(rows, first="limiter", note="p50 ratio, same rounds")],
        charts=[
            Bars(
                "ratelimit.png",
                "Rate-limit check: one hit",
                [m.label.replace("`", "") for m in results.values()],
                [m.stats.p50_us for m in results.values()],
                [m.stats.p99_us for m in results.values()],
            )
        ],
    )


async def _standalone(quick: bool) -> str:
    from bench.env import PrivateRedis

    budget = Budget(rounds=3, seconds=0.1 if quick else 0.5)
    with tempfile.TemporaryDirectory(prefix="companion-bench-rl-") as directory:
        redis = PrivateRedis(Path(directory))
        await redis.start()
        try:
            progress(f"private redis-server on port {redis.port}")
            results = await measure(redis.url, budget)
        finally:
            redis.stop()
    return "\n\n".join(table.render() for table in section(results).tables)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ratelimit", description="The rate-limit rows on their own.")
    parser.add_argument("--quick", action="store_true", help="shorter rounds")
    args = parser.parse_args(argv)
    print(asyncio.run(_standalone(args.quick)))


if __name__ == "__main__":
    main()
