"""Overload: one worker (uvicorn, PostgreSQL, the private Redis, the scripted model, admission
control sized from the sweep) driven by closed-loop chat streams at 1x, 2x, 5x and 10x the load that
saturates it, to show that it degrades on purpose: it refuses what it cannot serve (503
`overloaded`), keeps its throughput and its caches, and never reports a dependency as down.

- saturation: streams 1, 2, 4, 8, 16, 32 (up, then down again); the saturating load S is the fewest
  streams whose replies per second come within 10% of the best of the sweep;
- per level (S x 1, 2, 5, 10 streams), in rounds that each run every level once, in an order that
  changes from round to round: replies/s (replies that ended inside the measured window, over the
  window: the drain of a queue after it closes is not counted against a level), first-chunk p50/p99,
  requests shed (503 `overloaded`), other errors, cache hit rate (from /metrics, over the level),
  `/health` polled every half second (any dependency `down`, or the invalidation channel
  disconnected, is counted), and the recovery time: from the end of the load until a lone turn's
  first chunk is back within twice the unloaded p50 (probed turn after turn);
- a level's replies/s is the median over the rounds; the 10x goal is judged on the median of the
  per-round ratios (each round's 10x against the same round's figure for the peak level, the level
  with the best median), measured side by side, so that a machine getting slower or faster between
  rounds (other work coming and going) cancels out;
- per level also the share of a CPU the server used over the window and its replies per CPU-second
  (from /proc): on a shared machine replies/s follows the CPU the server is left, which varies by
  tens of percent from one window to the next; replies per CPU-second show whether a level costs
  more per reply (the load generator's own CPU is printed too: a few percent of one core at 10x);
- clients honour Retry-After, as OpenAI's client does; goals: other errors 0 at every level,
  replies/s at 10x at least 90% of the peak, cache hit rate within 5 points of the unloaded one,
  no dependency reported down.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.env import BenchEnv
from bench.harness import format_rate, format_us, percentile, progress
from bench.http import Server, Target, chat_load, prepare_targets, server_environment
from bench.loadgen import Stream
from bench.report import Lines, Outcome, Section, Table

SWEEP = (1, 2, 4, 8, 16, 32)
LEVELS = (1, 2, 5, 10)
# The order of the levels in each round: every level comes early and late, after a light level and
# after a heavy one.
ORDERS = ((1, 10, 2, 5), (5, 2, 10, 1), (10, 5, 1, 2), (2, 1, 5, 10))
LOG_ALARMS = ("database is unavailable", "invalidation channel lost", "circuit", "Traceback")
_SAMPLE = re.compile(r"^(companion_cache_(?:hits|misses)_total)\{([^}]*)\} ([0-9.e+-]+)$", re.M)


@dataclass
class Level:
    name: str
    streams: int
    result: dict[str, Any]
    hits: float
    misses: float
    health: Counter[str] = field(default_factory=Counter)
    recovery_s: float | None = None
    runs: list[dict[str, Any]] = field(default_factory=list)  # each round's own result, once merged

    @property
    def hit_rate(self) -> float:
        return self.hits / (self.hits + self.misses) if self.hits + self.misses else 0.0

    def merged(self, other: Level) -> Level:
        """This level and a repeat of it (another round), as one measurement."""
        outcomes = Counter(self.result["outcomes"]) + Counter(other.result["outcomes"])
        result = {
            "ttft_ns": self.result["ttft_ns"] + other.result["ttft_ns"],
            "total_ns": self.result["total_ns"] + other.result["total_ns"],
            "outcomes": dict(outcomes),
            "elapsed": float(self.result["elapsed"]) + float(other.result["elapsed"]),
            "completed": int(self.result["completed"]) + int(other.result["completed"]),
            "window": float(self.result["window"]) + float(other.result["window"]),
        }
        recoveries = [r for r in (self.recovery_s, other.recovery_s) if r is not None]
        return Level(
            self.name,
            self.streams,
            result,
            self.hits + other.hits,
            self.misses + other.misses,
            self.health + other.health,
            max(recoveries) if len(recoveries) == 2 else None,  # the worst; unknown if either is
            (self.runs or [self.result]) + (other.runs or [other.result]),
        )

    def _median(self, figure: Callable[[dict[str, Any]], float | None]) -> float | None:
        values = [v for v in map(figure, self.runs or [self.result]) if v is not None]
        return statistics.median(values) if values else None

    @property
    def rate(self) -> float:
        """Replies that ended inside the measured window, per second of window: the median over the
        rounds (the one round's, if not merged)."""
        return self._median(lambda r: int(r["completed"]) / float(r["window"])) or 0.0

    @property
    def rates(self) -> list[float]:
        return [int(r["completed"]) / float(r["window"]) for r in self.runs or [self.result]]

    @property
    def server_cpu(self) -> float | None:
        """The share of one CPU the server used over the window (median over the rounds): below 1,
        it waited (for its dependencies, or for a CPU other work on the machine held)."""
        return self._median(lambda r: None if r.get("server_cpu") is None else r["server_cpu"] / r["window"])

    @property
    def per_cpu_second(self) -> float | None:
        """Replies per CPU-second of the server (median over the rounds): what a reply costs, apart
        from how much CPU the machine left the server."""
        return self._median(lambda r: r["completed"] / r["server_cpu"] if r.get("server_cpu") else None)

    @property
    def shed(self) -> int:
        return int(self.result["outcomes"].get("503 overloaded", 0))

    @property
    def other_errors(self) -> int:
        return sum(n for k, n in self.result["outcomes"].items() if k not in ("200", "503 overloaded"))

    def ttft(self, fraction: float) -> float | None:
        values = sorted(self.result["ttft_ns"])
        return percentile(values, fraction) / 1000 if values else None


def peak_level(rounds: Sequence[dict[int, float]]) -> int:
    """The level with the most replies/s, by its median over the rounds."""
    return max(rounds[0], key=lambda level: statistics.median(rates[level] for rates in rounds))


def round_ratios(rounds: Sequence[dict[int, float]], level: int, against: int) -> list[float]:
    """Per round, `level`'s replies/s over `against`'s in the same round.

    Against one level chosen over all rounds (`peak_level`), not against each round's best: the best
    of four noisy figures is biased high, so that 10x would fall short of it by the noise alone (with
    every level truly equal and 10% noise per window, the median ratio to the round's best is 0.92,
    and passes 0.9 in two runs out of three)."""
    return [rates[level] / rates[against] for rates in rounds]


async def cache_counts(client: httpx.AsyncClient) -> tuple[float, float]:
    """(hits, misses) over every cache namespace, from /metrics."""
    text = (await client.get("/metrics")).text
    hits = misses = 0.0
    for name, _labels, value in _SAMPLE.findall(text):
        if name.endswith("hits_total"):
            hits += float(value)
        else:
            misses += float(value)
    return hits, misses


async def poll_health(client: httpx.AsyncClient, seen: Counter[str], stop: asyncio.Event) -> None:
    """GET /health every half second until `stop`; count what each dependency was reported as."""
    while not stop.is_set():
        try:
            body = (await client.get("/health", timeout=10)).json()
            checks = body["checks"]
            seen[f"database {checks['database']['status']}"] += 1
            seen[f"redis {checks['redis']['status']}"] += 1
            seen[f"channel {checks['redis'].get('invalidation_channel', '-')}"] += 1
        except (httpx.HTTPError, ValueError, KeyError):
            seen["health unanswered"] += 1
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.5):
                await stop.wait()


def reported_down(seen: Counter[str]) -> int:
    return sum(n for k, n in seen.items() if k in ("database down", "redis down", "channel disconnected"))


async def probe_recovery(server: Server, probe: Target, threshold_us: float, *, within: float = 30.0) -> float | None:
    """Seconds from now until a lone turn's first chunk is within `threshold_us` (None: not within)."""
    stream = Stream("127.0.0.1", server.port, probe.key, probe.conversation)
    await stream.connect()
    started = time.perf_counter()
    try:
        number = 0
        while time.perf_counter() - started < within:
            number += 1
            try:
                _, first_token, _ = await stream.request(9_000_000 + number)
            except Exception:  # a refused or failed probe: not recovered yet
                await stream.close()
                await stream.connect()
                continue
            if first_token / 1000 <= threshold_us:
                return time.perf_counter() - started
        return None
    finally:
        await stream.close()


async def measure(
    server: Server,
    client: httpx.AsyncClient,
    name: str,
    targets: list[Target],
    *,
    warmup: float,
    duration: float,
    probe: Target | None = None,
    threshold_us: float = 0.0,
) -> Level:
    hits_before, misses_before = await cache_counts(client)
    seen: Counter[str] = Counter()
    stop = asyncio.Event()
    poller = asyncio.create_task(poll_health(client, seen, stop))
    try:
        result = await chat_load(server, targets, warmup=warmup, duration=duration, retry_after=True)
    finally:
        stop.set()
        await poller
    recovery = await probe_recovery(server, probe, threshold_us) if probe is not None else None
    hits_after, misses_after = await cache_counts(client)
    hits, misses = hits_after - hits_before, misses_after - misses_before
    level = Level(name, len(targets), result, hits, misses, seen, recovery)
    progress(
        f"overload: {name}, {len(targets)} streams: {level.rate:.1f} replies/s ("
        f"{len(result['ttft_ns']) / float(result['elapsed']):.1f} counted to the end of the drain), server CPU "
        f"{_share(level.server_cpu)}, load generator CPU {_share(result.get('loadgen_cpu'), result['window'])}, "
        f"{_number(level.per_cpu_second)} replies per CPU-second, first chunk p50 "
        f"{format_us(level.ttft(0.5))}, shed {level.shed}, other errors {level.other_errors}, "
        f"cache hit rate {100 * level.hit_rate:.1f}%, health {dict(seen)}, recovery "
        f"{'n/a' if recovery is None else f'{recovery:.2f} s'}"
    )
    return level


async def run(env: BenchEnv, *, quick: bool) -> Outcome:
    warmup, duration = (0.5, 2.0) if quick else (1.0, 3.0)
    rounds = 2 if quick else len(ORDERS)
    sweep_seconds = 1.0 if quick else 3.0
    sweep = SWEEP[:4] if quick else SWEEP
    most = max(sweep) * max(LEVELS)
    progress(f"overload: seeding {most + 1} conversations")
    targets = await prepare_targets(env, most + 1, per_user=5, prefix="bench-overload")
    probe, targets = targets[-1], targets[:-1]
    sweep_levels: list[Level] = []
    logs: list[str] = []
    # The sweep runs with admission control out of the way, to find where the worker saturates.
    server = Server(server_environment(env, ADMISSION_MAX_TURNS="10000"), workers=1, cwd=env.workdir)
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            progress("overload: warming the sweep's conversations")
            await chat_load(server, targets[: max(sweep)], warmup=0.0, duration=1.0 if quick else 3.0)
            swept: dict[int, Level] = {}
            for streams in [*sweep, *reversed(sweep)]:  # up and down again, as the levels
                point = await measure(
                    server, client, f"sweep {streams}", targets[:streams], warmup=0.3, duration=sweep_seconds
                )
                swept[streams] = swept[streams].merged(point) if streams in swept else point
            sweep_levels = [swept[streams] for streams in sweep]
    finally:
        server.stop()
        logs.append(_log(server))
    best = max(level.rate for level in sweep_levels)
    saturating = next(level.streams for level in sweep_levels if level.rate >= 0.9 * best)
    unloaded = sweep_levels[0]
    threshold = 2 * (unloaded.ttft(0.5) or 0.0)
    # The levels run with the limits docs/deployment.md recommends for a CPU-bound worker: the
    # saturating concurrency in flight (more only adds latency), twice as many waiting.
    limits = {"ADMISSION_MAX_TURNS": str(saturating), "ADMISSION_TURN_QUEUE": str(2 * saturating)}
    progress(f"overload: saturated at {saturating} streams ({best:.1f} replies/s at best); levels with {limits}")
    server = Server(server_environment(env, **limits), workers=1, cwd=env.workdir)
    await server.start()
    per_round: list[dict[int, float]] = []
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            await chat_load(server, targets, warmup=0.0, duration=1.0 if quick else 3.0)
            # Rounds of every level, in an order that changes from round to round, so that drift on a
            # shared machine (other work coming and going) weighs on every level alike and each
            # round's levels can be compared with each other.
            measured: dict[int, Level] = {}
            for number in range(rounds):
                rates: dict[int, float] = {}
                for factor in ORDERS[number % len(ORDERS)]:
                    streams = min(saturating * factor, len(targets))
                    level = await measure(
                        server,
                        client,
                        f"{factor}x",
                        targets[:streams],
                        warmup=warmup,
                        duration=duration,
                        probe=probe,
                        threshold_us=threshold,
                    )
                    rates[factor] = level.rate
                    measured[factor] = measured[factor].merged(level) if factor in measured else level
                per_round.append(rates)
                progress(
                    f"overload: round {number + 1}: "
                    + ", ".join(f"{factor}x {rate:.1f}" for factor, rate in sorted(rates.items()))
                    + " replies/s"
                )
            levels = [measured[factor] for factor in LEVELS]
    finally:
        server.stop()
        logs.append(_log(server))
    alarms = {needle: sum(log.count(needle) for log in logs) for needle in LOG_ALARMS}
    return _outcome(
        sweep_levels,
        levels,
        per_round,
        saturating,
        unloaded,
        alarms,
        limits,
        window=f"{duration:g} s after a {warmup:g} s warm-up",
    )


def _share(value: float | None, over: float = 1.0) -> str:
    return "n/a" if value is None else f"{100 * value / over:.0f}%"


def _number(value: float | None) -> str:
    return "n/a" if value is None else format_rate(value)


def _log(server: Server) -> str:
    return server.log.read_text(errors="replace") if server.log.exists() else ""


def _outcome(
    sweep: list[Level],
    levels: list[Level],
    per_round: list[dict[int, float]],
    saturating: int,
    unloaded: Level,
    alarms: dict[str, int],
    limits: dict[str, str],
    *,
    window: str,
) -> Outcome:
    outcome = Outcome()
    peak = max(level.rate for level in levels)
    peak_factor = peak_level(per_round)
    ratios = round_ratios(per_round, max(LEVELS), peak_factor)
    top = levels[-1]
    ratio = statistics.median(ratios)
    rows = []
    for level in levels:
        rates = level.rates
        rows.append(
            [
                level.name,
                str(level.streams),
                format_rate(level.rate),
                f"{format_rate(min(rates))} to {format_rate(max(rates))}",
                f"{100 * level.rate / peak:.0f}%",
                _share(level.server_cpu),
                _number(level.per_cpu_second),
                format_us(level.ttft(0.5)),
                format_us(level.ttft(0.99)),
                str(level.shed),
                str(level.other_errors),
                f"{100 * level.hit_rate:.1f}%",
                str(reported_down(level.health)),
                "—" if level.recovery_s is None else f"{level.recovery_s:.2f} s",
            ]
        )
    sweep_rows = [
        [str(level.streams), format_rate(level.rate), format_us(level.ttft(0.5)), format_us(level.ttft(0.99))]
        for level in sweep
    ]
    goals = [
        ("other errors 0 at every level", all(level.other_errors == 0 for level in levels),
         ", ".join(str(level.other_errors) for level in levels)),
        ("replies/s at 10x ≥ 90% of the peak", ratio >= 0.9,
         f"median of the rounds {100 * ratio:.0f}% of {peak_factor}x, the peak level; rounds "
         + ", ".join(f"{100 * r:.0f}%" for r in ratios)),
        ("cache hit rate within 5 points of unloaded", all(abs(lv.hit_rate - unloaded.hit_rate) <= 0.05 for lv in levels),
         f"unloaded {100 * unloaded.hit_rate:.1f}%, levels "
         + ", ".join(f"{100 * level.hit_rate:.1f}%" for level in levels)),
        ("no dependency reported down", all(reported_down(level.health) == 0 for level in levels)
         and not alarms["database is unavailable"] and not alarms["invalidation channel lost"],
         f"/health down reports {sum(reported_down(level.health) for level in levels)}; log: {alarms}"),
    ]  # fmt: skip
    notes = [f"- {goal}: **{'met' if ok else 'missed'}** ({measured})" for goal, ok, measured in goals]
    best = max(levels[:-1], key=lambda level: level.rate)  # the best level below 10x
    if top.per_cpu_second and best.per_cpu_second:
        notes.append(
            f"- not a goal, what lies behind the 10x figure: a reply at 10x cost the server "
            f"{100 * best.per_cpu_second / top.per_cpu_second:.0f}% of the CPU one cost at {best.name}, the best "
            f"level below it (replies per CPU-second {_number(top.per_cpu_second)} against "
            f"{_number(best.per_cpu_second)}); the server used {_share(top.server_cpu)} of a CPU at 10x, "
            f"{_share(best.server_cpu)} at {best.name}"
        )
    outcome.sections.append(
        Section(
            title="Overload: one worker at 1x, 2x, 5x and 10x its saturating load",
            intro=(
                f"One uvicorn worker, PostgreSQL, the private Redis, the scripted model. Closed-loop streams, one "
                f"conversation each, clients honouring Retry-After. The sweep (admission control out of the way) "
                f"found the worker saturated at **{saturating} streams** (the fewest within 10% of the best "
                f"replies/s); the levels ran with admission sized as docs/deployment.md says: "
                f"{', '.join(f'{k}={v}' for k, v in limits.items())}. Unloaded (1 stream): first "
                f"chunk p50 {format_us(unloaded.ttft(0.5))}, cache hit rate {100 * unloaded.hit_rate:.1f}%. "
                + f"{len(per_round)} rounds, each running every level once ({window}), in an order that changes "
                "from round to round. `replies/s`: replies that ended inside the window over its length, the "
                "median over the rounds (`rounds`: the lowest and the highest); the 10x goal is the median of "
                "the per-round ratios, each round's 10x over the same round's peak level (the level with "
                "the best median; against each round's own best, the noise alone would bias it low). "
                "`server CPU`: the share of "
                "one CPU the server process used over the window (below 100%, it waited: for PostgreSQL or "
                "Redis, or for a CPU other work held); `replies per CPU-s`: replies over the server's CPU "
                "time, what a reply costs it whatever else the machine was doing (both medians over the "
                "rounds). "
                "`of peak`: the median replies/s over the best level's; `down`: /health polls "
                "(every 0.5 s) that reported a dependency down or the invalidation channel disconnected; "
                "`recovery`: from the end of the load until a lone turn's first chunk is back within twice "
                "the unloaded p50.\n\n" + "\n".join(notes)
            ),
            tables=[
                Table(
                    [
                        "level",
                        "streams",
                        "replies/s",
                        "rounds",
                        "of peak",
                        "server CPU",
                        "replies per CPU-s",
                        "first chunk p50",
                        "first chunk p99",
                        "shed (503)",
                        "other errors",
                        "cache hit rate",
                        "down",
                        "recovery",
                    ],
                    rows,
                    right=set(range(1, 14)),
                ),
                Table(
                    ["sweep: streams", "replies/s", "first chunk p50", "first chunk p99"],
                    sweep_rows,
                    right={0, 1, 2, 3},
                ),
            ],
            charts=[
                Lines(
                    "overload.png",
                    "Replies per second and shed requests per second, one worker",
                    [float(level.streams) for level in levels],
                    {
                        "replies/s": [level.rate for level in levels],
                        "shed/s": [level.shed / float(level.result["window"]) or None for level in levels],
                    },
                    "concurrent streams",
                    "per second",
                    logy=False,
                )
            ],
        )
    )
    outcome.figures["overload.saturating_streams"] = float(saturating)
    outcome.figures["overload.peak_replies_per_s"] = peak
    outcome.figures["overload.10x_of_peak"] = ratio
    outcome.figures["overload.other_errors"] = float(sum(level.other_errors for level in levels))
    return outcome
