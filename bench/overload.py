"""Overload: one worker (uvicorn, PostgreSQL, the private Redis, the scripted model, admission
control sized from the sweep) driven by closed-loop chat streams at 1x, 2x, 5x and 10x the load that
saturates it, to show that it degrades on purpose: it refuses what it cannot serve (503
`overloaded`), keeps its throughput and its caches, and never reports a dependency as down.

- saturation: streams 1, 2, 4, 8, 16, 32 (up, then down again); the saturating load S is the fewest
  streams whose replies per second come within 10% of the best of the sweep;
- per level (S x 1, 2, 5, 10 streams, each run twice: up, then down again): replies/s, first-chunk p50/p99, requests shed (503
  `overloaded`), other errors, cache hit rate (from /metrics, over the level), `/health` polled
  every half second (any dependency `down`, or the invalidation channel disconnected, is counted),
  and the recovery time: from the end of the load until a lone turn's first chunk is back within
  twice the unloaded p50 (probed turn after turn);
- clients honour Retry-After, as OpenAI's client does; goals: other errors 0 at every level,
  replies/s at 10x at least 90% of the peak, cache hit rate within 5 points of the unloaded one,
  no dependency reported down.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import Counter
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
        )

    @property
    def rate(self) -> float:
        return len(self.result["ttft_ns"]) / float(self.result["elapsed"])

    @property
    def shed(self) -> int:
        return int(self.result["outcomes"].get("503 overloaded", 0))

    @property
    def other_errors(self) -> int:
        return sum(n for k, n in self.result["outcomes"].items() if k not in ("200", "503 overloaded"))

    def ttft(self, fraction: float) -> float | None:
        values = sorted(self.result["ttft_ns"])
        return percentile(values, fraction) / 1000 if values else None


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
        f"overload: {name}, {len(targets)} streams: {level.rate:.1f} replies/s, first chunk p50 "
        f"{format_us(level.ttft(0.5))}, shed {level.shed}, other errors {level.other_errors}, "
        f"cache hit rate {100 * level.hit_rate:.1f}%, health {dict(seen)}, recovery "
        f"{'n/a' if recovery is None else f'{recovery:.2f} s'}"
    )
    return level


async def run(env: BenchEnv, *, quick: bool) -> Outcome:
    warmup, duration = (0.5, 2.0) if quick else (1.5, 5.0)
    sweep_seconds = 1.0 if quick else 3.0
    sweep = SWEEP[:4] if quick else SWEEP
    most = max(sweep) * max(LEVELS)
    progress(f"overload: seeding {most + 1} conversations")
    targets = await prepare_targets(env, most + 1, per_user=5, prefix="bench-overload")
    probe, targets = targets[-1], targets[:-1]
    levels: list[Level] = []
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
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            await chat_load(server, targets, warmup=0.0, duration=1.0 if quick else 3.0)
            # Two rounds, the second in reverse order, so that drift on a shared machine (other work
            # coming and going) weighs on every level alike.
            measured: dict[int, Level] = {}
            for factor in [*LEVELS, *reversed(LEVELS)]:
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
                measured[factor] = measured[factor].merged(level) if factor in measured else level
            levels = [measured[factor] for factor in LEVELS]
    finally:
        server.stop()
        logs.append(_log(server))
    alarms = {needle: sum(log.count(needle) for log in logs) for needle in LOG_ALARMS}
    return _outcome(sweep_levels, levels, saturating, unloaded, alarms, limits)


def _log(server: Server) -> str:
    return server.log.read_text(errors="replace") if server.log.exists() else ""


def _outcome(
    sweep: list[Level],
    levels: list[Level],
    saturating: int,
    unloaded: Level,
    alarms: dict[str, int],
    limits: dict[str, str],
) -> Outcome:
    outcome = Outcome()
    peak = max(level.rate for level in levels)
    rows = []
    for level in levels:
        rows.append(
            [
                level.name,
                str(level.streams),
                format_rate(level.rate),
                f"{100 * level.rate / peak:.0f}%",
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
    top = levels[-1]
    goals = [
        ("other errors 0 at every level", all(level.other_errors == 0 for level in levels),
         ", ".join(str(level.other_errors) for level in levels)),
        ("replies/s at 10x ≥ 90% of the peak", top.rate >= 0.9 * peak, f"{100 * top.rate / peak:.0f}%"),
        ("cache hit rate within 5 points of unloaded", all(abs(lv.hit_rate - unloaded.hit_rate) <= 0.05 for lv in levels),
         f"unloaded {100 * unloaded.hit_rate:.1f}%, levels "
         + ", ".join(f"{100 * level.hit_rate:.1f}%" for level in levels)),
        ("no dependency reported down", all(reported_down(level.health) == 0 for level in levels)
         and not alarms["database is unavailable"] and not alarms["invalidation channel lost"],
         f"/health down reports {sum(reported_down(level.health) for level in levels)}; log: {alarms}"),
    ]  # fmt: skip
    notes = [f"- {goal}: **{'met' if ok else 'missed'}** ({measured})" for goal, ok, measured in goals]
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
                "Each level ran twice (1x to 10x, then back), 5 s each after a 1.5 s warm-up, and is reported "
                "over both runs. `of peak`: replies/s over the best level's; `down`: /health polls "
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
                        "of peak",
                        "first chunk p50",
                        "first chunk p99",
                        "shed (503)",
                        "other errors",
                        "cache hit rate",
                        "down",
                        "recovery",
                    ],
                    rows,
                    right=set(range(1, 11)),
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
                        "shed/s": [level.shed / float(level.result["elapsed"]) or None for level in levels],
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
    outcome.figures["overload.10x_of_peak"] = top.rate / peak
    outcome.figures["overload.other_errors"] = float(sum(level.other_errors for level in levels))
    return outcome
