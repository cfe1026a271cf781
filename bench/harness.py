"""Timing: warm-up, many awaited iterations timed with perf_counter_ns, p50/p99/ops per second, and
side-by-side comparisons run in interleaved rounds so that machine noise hits every contender alike.

A comparison runs each case once per round, in an order that rotates from round to round. p50 is the
median of the rounds' p50s, p99 the 99th percentile of all samples pooled, ops/s the median of the
rounds' throughput (iterations over the loop's wall time). A ratio between two cases is taken per
round, on the same round's numbers, and the median of those is reported: on a shared machine that is
far steadier than a ratio of two medians measured minutes apart.
"""

from __future__ import annotations

import gc
import math
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

Op = Callable[[int], Awaitable[object]]  # iteration index -> one operation

_T0 = time.monotonic()


def progress(message: str) -> None:
    """One line of progress on stderr, with the time since the run started."""
    print(f"[{time.monotonic() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Linear interpolation between closest ranks (numpy's default). `sorted_values` ascending."""
    if not sorted_values:
        raise ValueError("no samples")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError("fraction must be within [0, 1]")
    position = fraction * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    weight = position - low
    return float(sorted_values[low]) * (1 - weight) + float(sorted_values[high]) * weight


@dataclass(frozen=True)
class Stats:
    """Latency in microseconds and throughput of one measured operation."""

    p50_us: float
    p99_us: float
    ops_per_s: float
    samples: int
    rounds: int = 1


def summarize(samples_ns: Sequence[int], wall_ns: int | None = None) -> Stats:
    """Stats for one batch of samples; ops/s from `wall_ns` (the loop's time) or the samples' sum."""
    ordered = sorted(samples_ns)
    elapsed = wall_ns if wall_ns is not None else sum(ordered)
    return Stats(
        p50_us=percentile(ordered, 0.50) / 1000,
        p99_us=percentile(ordered, 0.99) / 1000,
        ops_per_s=len(ordered) / (elapsed / 1e9) if elapsed > 0 else math.inf,
        samples=len(ordered),
    )


@dataclass
class Case:
    key: str  # stable id within its comparison, e.g. "l1"
    label: str
    op: Op


@dataclass
class Measured:
    key: str
    label: str
    rounds: list[Stats] = field(default_factory=list)
    samples_ns: list[int] = field(default_factory=list)

    @property
    def stats(self) -> Stats:
        pooled = sorted(self.samples_ns)
        return Stats(
            p50_us=statistics.median(r.p50_us for r in self.rounds),
            p99_us=percentile(pooled, 0.99) / 1000,
            ops_per_s=statistics.median(r.ops_per_s for r in self.rounds),
            samples=len(pooled),
            rounds=len(self.rounds),
        )

    def ratio(self, other: Measured) -> float:
        """Median over rounds of this p50 / the other's p50 in the same round (below 1: faster)."""
        pairs = [a.p50_us / b.p50_us for a, b in zip(self.rounds, other.rounds, strict=False) if b.p50_us > 0]
        return statistics.median(pairs) if pairs else math.nan


async def time_loop(op: Op, iterations: int, start: int = 0) -> tuple[list[int], int]:
    """Await `op` `iterations` times, one at a time; the samples (ns) and the loop's wall time (ns)."""
    clock = time.perf_counter_ns
    samples = [0] * iterations
    began = clock()
    for index in range(iterations):
        before = clock()
        await op(start + index)
        samples[index] = clock() - before
    return samples, clock() - began


@dataclass(frozen=True)
class Budget:
    """How long each case runs: per round, `seconds` of iterations, within [min_iterations,
    max_iterations]; `warmup_seconds` (at least 3 iterations) before the first round."""

    rounds: int = 5
    seconds: float = 0.4
    min_iterations: int = 50
    max_iterations: int = 50_000
    warmup_seconds: float = 0.15

    def iterations_for(self, seconds_per_op: float) -> int:
        wanted = int(self.seconds / max(seconds_per_op, 1e-9))
        return max(self.min_iterations, min(self.max_iterations, wanted))


async def warm_up(op: Op, seconds: float, start: int = 0) -> tuple[float, int]:
    """Run `op` for about `seconds` (at least 3 times); its mean time per op, and iterations done."""
    clock = time.perf_counter
    began = clock()
    done = 0
    while done < 3 or (clock() - began < seconds and done < 100_000):
        await op(start + done)
        done += 1
    return (clock() - began) / done, done


async def compare(cases: Sequence[Case], budget: Budget, *, title: str = "") -> dict[str, Measured]:
    """Measure `cases` side by side in interleaved, rotating rounds. Keyed by `Case.key`."""
    results = {case.key: Measured(case.key, case.label) for case in cases}
    iterations: dict[str, int] = {}
    offsets: dict[str, int] = {}
    for case in cases:
        per_op, done = await warm_up(case.op, budget.warmup_seconds)
        iterations[case.key] = budget.iterations_for(per_op)
        offsets[case.key] = done
    for round_index in range(budget.rounds):
        shift = round_index % len(cases)
        for case in [*cases[shift:], *cases[:shift]]:
            gc.collect()
            count = iterations[case.key]
            samples, wall = await time_loop(case.op, count, start=offsets[case.key])
            offsets[case.key] += count
            stats = summarize(samples, wall)
            results[case.key].rounds.append(stats)
            results[case.key].samples_ns.extend(samples)
        progress(
            f"{title}: round {round_index + 1}/{budget.rounds}  "
            + "  ".join(f"{c.key} {format_us(results[c.key].rounds[-1].p50_us)}" for c in cases)
        )
    return results


def format_us(value_us: float | None) -> str:
    """A latency in the unit that reads best: ns below 1 µs, µs below 1 ms, else ms or s."""
    if value_us is None or math.isnan(value_us):
        return "n/a"
    if value_us < 1:
        return f"{value_us * 1000:.0f} ns"
    if value_us < 10:
        return f"{value_us:.2f} µs"
    if value_us < 1000:
        return f"{value_us:.0f} µs" if value_us >= 100 else f"{value_us:.1f} µs"
    if value_us < 1_000_000:
        ms = value_us / 1000
        return f"{ms:.2f} ms" if ms < 10 else f"{ms:.1f} ms" if ms < 100 else f"{ms:.0f} ms"
    return f"{value_us / 1e6:.2f} s"


def format_rate(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"
