"""Rate limiter benchmark: our GCRA limiters beside the `limits` library, in one run, against one Redis.

    python -m bench.ratelimit                       # 5000 hits per limiter and round, 3 rounds
    python -m bench.ratelimit --quick               # 1000 hits
    python -m bench.ratelimit --redis-url redis://127.0.0.1:6380/15 --iterations 20000 --rounds 5

Measured, each on its own keys, the same limit (50 per minute) and the same traffic (hits cycling over
64 subjects, so both admitted and refused decisions are taken):

- ours, Redis:   `RedisRateLimiter.hit` (GCRA, one EVALSHA, through the app's RedisBackend/breaker)
- ours, memory:  `MemoryRateLimiter.hit` (GCRA in process)
- limits, Redis: `limits.aio` moving window and fixed window on `RedisStorage` (redis-py)
- limits, memory: `limits.aio` moving window on `MemoryStorage`, for the in-process comparison

Each hit is awaited on its own (latency, not pipelining): p50/p99 are per hit, ops/s is hits over the
loop's wall time. Every round runs every limiter after a warm-up, in a rotating order; the table shows
the median over rounds, then the ratios ours/limits (latency: below 1 is faster; ops/s: above 1 is
faster). Progress goes to stderr, the markdown table to stdout.

The benchmark only writes keys under `bench:<run id>:` and deletes them at the end (SCAN + UNLINK of
that prefix; never FLUSHDB), so the default database 15 of a shared Redis is safe to use.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import redis.asyncio as aioredis

from companion.cache.redis import RedisBackend, make_client
from companion.ratelimit.limiter import Limit, MemoryRateLimiter, RedisRateLimiter

DEFAULT_URL = "redis://127.0.0.1:6379/15"
PER_MINUTE = 50
SUBJECTS = 64

Hit = Callable[[int], Awaitable[object]]


@dataclass
class Contender:
    name: str
    storage: str
    family: str  # "ours" or "limits"
    make: Callable[[str], Hit]  # key prefix for this round -> one hit
    p50_us: list[float] = field(default_factory=list)
    p99_us: list[float] = field(default_factory=list)
    ops: list[float] = field(default_factory=list)

    @property
    def p50(self) -> float:
        return statistics.median(self.p50_us)

    @property
    def p99(self) -> float:
        return statistics.median(self.p99_us)

    @property
    def ops_per_second(self) -> float:
        return statistics.median(self.ops)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def percentile(sorted_values: list[int], fraction: float) -> float:
    index = min(round(fraction * (len(sorted_values) - 1)), len(sorted_values) - 1)
    return float(sorted_values[index])


async def measure(hit: Hit, iterations: int) -> tuple[float, float, float]:
    """p50 and p99 in µs, and ops/s, for `iterations` sequential hits."""
    samples: list[int] = []
    clock = time.perf_counter_ns
    started = clock()
    for index in range(iterations):
        before = clock()
        await hit(index)
        samples.append(clock() - before)
    elapsed = (clock() - started) / 1e9
    samples.sort()
    return percentile(samples, 0.50) / 1000, percentile(samples, 0.99) / 1000, iterations / elapsed


def build_contenders(url: str, run_prefix: str) -> tuple[list[Contender], list[Callable[[], Awaitable[None]]]]:
    from limits import RateLimitItemPerMinute
    from limits.aio.storage import MemoryStorage, RedisStorage
    from limits.aio.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter

    closers: list[Callable[[], Awaitable[None]]] = []
    limit = Limit("bench", PER_MINUTE, 60)
    item = RateLimitItemPerMinute(PER_MINUTE)

    backend = RedisBackend(make_client(url, max_connections=8))
    closers.append(backend.aclose)
    ours_redis = RedisRateLimiter(backend)
    ours_memory = MemoryRateLimiter()

    storage_url = "async+" + url if not url.startswith("async+") else url
    limits_redis = RedisStorage(storage_url, implementation="redispy", key_prefix=f"{run_prefix}limits")
    limits_memory = MemoryStorage("async+memory://")
    moving_redis = MovingWindowRateLimiter(limits_redis)
    fixed_redis = FixedWindowRateLimiter(limits_redis)
    moving_memory = MovingWindowRateLimiter(limits_memory)

    async def close_limits() -> None:
        # The redis-py client inside limits' bridge (limits has no public close).
        client = getattr(limits_redis.bridge, "storage", None)
        if client is not None and hasattr(client, "aclose"):
            await client.aclose()

    closers.append(close_limits)

    def ours_redis_hit(prefix: str) -> Hit:
        return lambda i: ours_redis.hit(f"{prefix}{i % SUBJECTS}", limit)

    def ours_memory_hit(prefix: str) -> Hit:
        return lambda i: ours_memory.hit(f"{prefix}{i % SUBJECTS}", limit)

    def limits_hit(strategy: MovingWindowRateLimiter | FixedWindowRateLimiter) -> Callable[[str], Hit]:
        return lambda prefix: lambda i: strategy.hit(item, f"{prefix}{i % SUBJECTS}")

    contenders = [
        Contender("ours: RedisRateLimiter (GCRA)", "redis", "ours", ours_redis_hit),
        Contender("limits: moving window", "redis", "limits", limits_hit(moving_redis)),
        Contender("limits: fixed window", "redis", "limits", limits_hit(fixed_redis)),
        Contender("ours: MemoryRateLimiter (GCRA)", "memory", "ours", ours_memory_hit),
        Contender("limits: moving window", "memory", "limits", limits_hit(moving_memory)),
    ]
    return contenders, closers


async def delete_prefix(client: aioredis.Redis, prefix: str) -> int:
    """UNLINK every key under `prefix` (which always starts with `bench:`)."""
    assert prefix.startswith("bench:"), prefix
    removed = 0
    batch: list[bytes] = []
    async for key in client.scan_iter(match=prefix + "*", count=1000):
        batch.append(key)
        if len(batch) >= 500:
            removed += await client.unlink(*batch)
            batch = []
    if batch:
        removed += await client.unlink(*batch)
    return removed


def ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}" if theirs else "n/a"


def render(contenders: list[Contender], *, iterations: int, rounds: int, server: str, redis_version: str) -> str:
    lines = [
        f"Rate limiter benchmark: {iterations} sequential hits per limiter and round, {rounds} rounds "
        f"(median over rounds), limit {PER_MINUTE}/min over {SUBJECTS} subjects; Redis {redis_version} at {server}.",
        "",
        "| limiter | storage | p50 (µs) | p99 (µs) | ops/s |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for c in contenders:
        lines.append(f"| {c.name} | {c.storage} | {c.p50:.1f} | {c.p99:.1f} | {c.ops_per_second:,.0f} |")
    lines += [
        "",
        "| ours / limits | p50 | p99 | ops/s |",
        "| --- | ---: | ---: | ---: |",
    ]
    for storage in ("redis", "memory"):
        ours = next(c for c in contenders if c.storage == storage and c.family == "ours")
        for theirs in (c for c in contenders if c.storage == storage and c.family == "limits"):
            lines.append(
                f"| {ours.name.split(' (')[0].removeprefix('ours: ')} / {theirs.name.removeprefix('limits: ')} "
                f"({storage}) | {ratio(ours.p50, theirs.p50)} | {ratio(ours.p99, theirs.p99)} "
                f"| {ratio(ours.ops_per_second, theirs.ops_per_second)} |"
            )
    return "\n".join(lines)


async def run(url: str, iterations: int, rounds: int, warmup: int) -> str:
    run_prefix = f"bench:{uuid.uuid4().hex[:12]}:"
    admin = aioredis.Redis.from_url(url, socket_timeout=5)
    try:
        try:
            info = await admin.info("server")
        except (OSError, aioredis.RedisError) as error:
            raise SystemExit(f"error: cannot reach Redis at {redacted(url)} ({type(error).__name__})") from None
        contenders, closers = build_contenders(url, run_prefix)
        try:
            for round_index in range(rounds):
                shift = round_index % len(contenders)
                for c in contenders[shift:] + contenders[:shift]:
                    slot = contenders.index(c)
                    prefix = f"{run_prefix}r{round_index}:c{slot}:"
                    warm = c.make(prefix + "warm:")
                    for index in range(warmup):
                        await warm(index)
                    p50, p99, ops = await measure(c.make(prefix), iterations)
                    c.p50_us.append(p50)
                    c.p99_us.append(p99)
                    c.ops.append(ops)
                    progress(
                        f"round {round_index + 1}/{rounds}  {c.name} [{c.storage}]: "
                        f"p50 {p50:.1f} µs  p99 {p99:.1f} µs  {ops:,.0f} ops/s"
                    )
        finally:
            for close in closers:
                await close()
            removed = await delete_prefix(admin, run_prefix)
            progress(f"deleted {removed} benchmark keys under {run_prefix}")
        return render(
            contenders,
            iterations=iterations,
            rounds=rounds,
            server=redacted(url),
            redis_version=str(info.get("redis_version", "?")),
        )
    finally:
        await admin.aclose()


def redacted(url: str) -> str:
    """host:port/db, never a password."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ratelimit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default=DEFAULT_URL, help=f"Redis to use (default {DEFAULT_URL})")
    parser.add_argument("--iterations", "-n", type=int, default=5000, help="hits per limiter and round")
    parser.add_argument("--quick", action="store_true", help="1000 hits per limiter and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the table shows the median (default 3)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up hits before each measurement")
    args = parser.parse_args(argv)
    iterations = 1000 if args.quick else args.iterations
    if iterations < 1 or args.rounds < 1:
        parser.error("--iterations and --rounds must be at least 1")
    warmup = args.warmup if args.warmup is not None else max(iterations // 10, 50)
    progress(
        f"{iterations} hits x {args.rounds} rounds per limiter, {warmup} warm-up hits, Redis {redacted(args.redis_url)}"
    )
    print(asyncio.run(run(args.redis_url, iterations, args.rounds, warmup)))


if __name__ == "__main__":
    main()
