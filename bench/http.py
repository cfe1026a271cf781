"""HTTP, end to end: the service runs as a subprocess (uvicorn with the app factory, one worker and
several), the load comes from other processes (wrk for the read endpoints when it is installed, else
the Python load generator; `bench.loadgen` for the streamed chat replies), all on loopback.

- read endpoints: `GET /v1/preferences` (served from the caches) and `GET /v1/conversations/{id}/
  messages?limit=20` (a database page), throughput and latency over 10 connections;
- chat: time to the first streamed chunk of a reply (`event: token`) with the scripted LLM, which
  answers at once, so the figure is the service's own overhead: authentication, rate limit, storing
  the user's message, context assembly, the first token's row; at 1, 10 and 100 concurrent streams.
- resume: time from `GET .../messages/{id}/stream` with `Last-Event-ID` to its first replayed event,
  on the server that generated the reply (its in-process log) and on another one (the Redis Stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench import seed
from bench.env import BenchEnv, end_process, free_port
from bench.harness import Stats, format_rate, format_us, percentile, progress, summarize
from bench.report import Lines, Outcome, Row, Section, Table, latency_table

PROFILE_DIR = Path(".bench/profiles")
CONCURRENCY = (1, 10, 100)


class Server:
    """`uvicorn --factory companion.app:create_app_from_env` in a subprocess."""

    def __init__(self, environment: dict[str, str], *, workers: int, cwd: Path) -> None:
        self.port = free_port()
        self.workers = workers
        self.environment = environment
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None
        self.log = cwd / f"server-{self.port}.log"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, *, within: float = 120.0) -> None:
        argv = [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "companion.app:create_app_from_env",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
            "--log-level",
            "warning",
            "--no-access-log",
        ]
        with open(self.log, "ab") as log:
            # cwd: a scratch folder, so no developer's .env is read.
            self.process = subprocess.Popen(
                argv, env=self.environment, cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        async with httpx.AsyncClient(timeout=2) as client:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the server exited at start-up:\n{self.log.read_text()[-3000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(self.base_url + "/health")).status_code == 200:
                        break
                if loop.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"the server did not answer /health within {within:.0f} s")
                await asyncio.sleep(0.1)
        if self.workers > 1:  # every worker must be up, not just the first to answer
            await asyncio.sleep(1.0)

    def stop(self) -> None:
        process, self.process = self.process, None
        end_process(process, grace_seconds=30)


@dataclass
class Target:
    key: str
    conversation: str


async def prepare_targets(env: BenchEnv, streams: int, *, per_user: int = 10, prefix: str = "bench-http") -> list[Target]:
    """One conversation per stream, spread over users (`per_user` streams per user)."""
    services = await env.services(redis=True)
    targets: list[Target] = []
    try:
        for index in range(streams):
            if index % per_user == 0:
                user = await services.users.create(f"{prefix}-{index // per_user}")
            seeded = await seed.conversation(services.database, user.id, messages=4)
            targets.append(Target(user.api_key, str(seeded.conversation.id)))
    finally:
        await env.close_services(services)
    return targets


async def chat_load(
    server: Server,
    targets: list[Target],
    *,
    warmup: float,
    duration: float,
    profile_to: Path | None = None,
    retry_after: bool = True,
) -> dict[str, Any]:
    job = {
        "host": "127.0.0.1",
        "port": server.port,
        "warmup": warmup,
        "duration": duration,
        "retry_after": retry_after,
        "streams": [{"key": t.key, "conversation": t.conversation} for t in targets],
        "server_pid": server.process.pid if server.process is not None and server.workers == 1 else None,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.loadgen",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=Path(__file__).resolve().parent.parent,
    )
    spy: asyncio.subprocess.Process | None = None
    if profile_to is not None and server.process is not None:
        spy = await start_py_spy(server.process.pid, warmup, duration, profile_to)
    out, err = await process.communicate(json.dumps(job).encode())
    if spy is not None:
        await spy.wait()
    if process.returncode != 0:
        raise RuntimeError(f"the load generator failed: {err.decode()[-2000:]}")
    return json.loads(out)


async def start_py_spy(pid: int, warmup: float, duration: float, path: Path) -> asyncio.subprocess.Process | None:
    binary = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(binary).exists():
        progress("py-spy is not installed: no HTTP profile")
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    await asyncio.sleep(warmup)
    return await asyncio.create_subprocess_exec(
        binary,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(int(duration), 1)),
        "--rate",
        "500",
        "--format",
        "raw",
        "--output",
        str(path),
        "--nonblocking",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


def summarize_collapsed(path: Path, *, top: int = 25) -> str:
    """py-spy's collapsed stacks → the functions with the most inclusive and self time."""
    inclusive: dict[str, int] = defaultdict(int)
    own: dict[str, int] = defaultdict(int)
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        for frame in set(frames):
            inclusive[frame] += count
        own[frames[-1]] += count
    if not total:
        return "no samples"

    def table(counts: dict[str, int], title: str) -> list[str]:
        lines = [title]
        for frame, count in sorted(counts.items(), key=lambda item: -item[1])[:top]:
            lines.append(f"  {100 * count / total:5.1f}%  {frame}")
        return lines

    ours = {frame: count for frame, count in inclusive.items() if "companion/" in frame}
    return "\n".join(
        [
            f"{total} samples",
            *table(ours, "inclusive, companion's functions:"),
            "",
            *table(own, "self time, any function:"),
        ]
    )


WRK_LATENCY = re.compile(r"^\s*(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.M)
WRK_RATE = re.compile(r"Requests/sec:\s+([\d.]+)")
UNITS = {"us": 1.0, "ms": 1000.0, "s": 1_000_000.0}


async def read_load(url: str, key: str, seconds: float) -> Stats:
    """Throughput and latency of GET `url` over 10 connections: wrk, or a Python client."""
    wrk = shutil.which("wrk")
    if wrk is None:
        return await python_read_load(url, key, seconds)
    process = await asyncio.create_subprocess_exec(
        wrk,
        "-t2",
        "-c10",
        f"-d{max(int(seconds), 1)}s",
        "--latency",
        "-H",
        f"Authorization: Bearer {key}",
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, _ = await process.communicate()
    text = out.decode()
    latency = {m.group(1): float(m.group(2)) * UNITS[m.group(3)] for m in WRK_LATENCY.finditer(text)}
    rate = WRK_RATE.search(text)
    if "50" not in latency or rate is None or "Non-2xx" in text:
        raise RuntimeError(f"wrk failed or got errors:\n{text}")
    return Stats(
        p50_us=latency["50"], p99_us=latency.get("99", float("nan")), ops_per_s=float(rate.group(1)), samples=0
    )


async def python_read_load(url: str, key: str, seconds: float) -> Stats:
    script = (
        "import asyncio,sys,time,json,httpx\n"
        "async def main(url,key,seconds):\n"
        "  s=[];stop=time.monotonic()+seconds\n"
        "  async with httpx.AsyncClient(headers={'Authorization':'Bearer '+key}) as c:\n"
        "    async def one():\n"
        "      while time.monotonic()<stop:\n"
        "        t=time.perf_counter_ns();r=await c.get(url);s.append(time.perf_counter_ns()-t);r.raise_for_status()\n"
        "    t0=time.monotonic();await asyncio.gather(*(one() for _ in range(10)));el=time.monotonic()-t0\n"
        "  print(json.dumps({'s':s,'el':el}))\n"
        "asyncio.run(main(sys.argv[1],sys.argv[2],float(sys.argv[3])))\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, url, key, str(seconds), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await process.communicate()
    data = json.loads(out)
    stats = summarize(data["s"])
    return Stats(stats.p50_us, stats.p99_us, len(data["s"]) / data["el"], len(data["s"]))


async def resume_latency(origin: Server, other: Server, target: Target, count: int) -> dict[str, Stats]:
    """Per round: a reply is asked for on `origin` and its stream closed after the first event (the
    reply goes on without it), then resumed after that event on `origin` and on `other`; each time is
    from sending the resume request to receiving its first replayed event."""
    clock = time.perf_counter_ns
    samples: dict[str, list[int]] = {"same": [], "other": []}
    headers = {"Authorization": f"Bearer {target.key}"}
    path = f"/v1/conversations/{target.conversation}/messages"

    async def first_data(response: httpx.Response) -> dict[str, Any]:
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                return json.loads(line[5:])  # type: ignore[no-any-return]
        raise RuntimeError("the stream ended without an event")

    async with httpx.AsyncClient(headers=headers, timeout=30) as client:
        for index in range(count + 5):  # the first 5 warm up
            async with client.stream("POST", origin.base_url + path, json={"content": f"Resume me ({index})"}) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"POST answered {r.status_code}: {(await r.aread())[:300]!r}")
                message_id = (await first_data(r))["message_id"]
            for name, server in (("same", origin), ("other", other)):
                started = clock()
                async with client.stream(
                    "GET", f"{server.base_url}{path}/{message_id}/stream", headers={"Last-Event-ID": "0"}
                ) as r:
                    await first_data(r)
                if index >= 5:
                    samples[name].append(clock() - started)
    return {name: summarize(values) for name, values in samples.items()}


def server_environment(env: BenchEnv, **overrides: str) -> dict[str, str]:
    base = {
        # Limits stay on (the check is part of every request) but high enough never to refuse.
        "RATE_LIMIT_REQUESTS_PER_MINUTE": "1000000",
        "RATE_LIMIT_IP_REQUESTS_PER_MINUTE": "1000000",
        "ENVIRONMENT": "production",
    }
    base.update(overrides)
    return env.server_environment(redis=True, **base)


async def in_process_turns(env: BenchEnv, turns: int) -> dict[str, Stats]:
    """One stream of chat turns straight through ChatService (no HTTP), Redis on: where the time to the
    first token goes before any server is involved."""
    from companion.chat.service import TokenEvent

    services = await env.services(redis=True)
    await services.memories.start()
    user = await services.users.create("bench-http-in-process")
    conversation = (await seed.conversation(services.database, user.id, messages=4)).conversation
    clock = time.perf_counter_ns
    phases: dict[str, list[int]] = {"begin": [], "first": [], "whole": []}
    try:
        for index in range(turns + 20):  # the first 20 warm up
            started = clock()
            turn = await services.chat.begin(user.id, conversation, f"How is it going today? ({index})")
            begun = clock()
            first = 0
            async for event in services.chat.run(turn):
                if not first and isinstance(event, TokenEvent):
                    first = clock()
            if index >= 20:
                phases["begin"].append(begun - started)
                phases["first"].append(first - started)
                phases["whole"].append(clock() - started)
        await services.summarizer.wait_idle()
    finally:
        await env.close_services(services)
    return {name: summarize(samples) for name, samples in phases.items()}


async def run(env: BenchEnv, *, quick: bool, workers: int, profile: bool = False) -> Outcome:
    warmup, duration, read_seconds = (0.3, 1.0, 1) if quick else (2.0, 8.0, 5)
    concurrency = CONCURRENCY
    in_process = await in_process_turns(env, 30 if quick else 300)
    progress(f"http: in process, first token p50 {format_us(in_process['first'].p50_us)}")
    targets = await prepare_targets(env, max(concurrency))
    services = await env.services(redis=True)
    reader = await services.users.create("bench-http-reader")
    page = await seed.conversation(services.database, reader.id, messages=40)
    await env.close_services(services)
    read_urls = {
        "GET /v1/preferences (cached)": "/v1/preferences",
        "GET /v1/conversations/{id}/messages?limit=20 (database)": f"/v1/conversations/{page.conversation.id}/messages?limit=20",
    }
    read_rows: list[list[str]] = []
    chat: dict[tuple[int, int], dict[str, Any]] = {}
    outcome = Outcome()
    for count in sorted({1, workers}):
        server = Server(server_environment(env), workers=count, cwd=env.workdir)
        progress(f"http: starting the server with {count} worker(s) on port {server.port}")
        await server.start()
        try:
            for label, path in read_urls.items():
                stats = await read_load(server.base_url + path, reader.api_key, read_seconds)
                progress(f"http: {label}, {count} worker(s): p50 {format_us(stats.p50_us)}, {stats.ops_per_s:,.0f}/s")
                read_rows.append(
                    [label, str(count), format_us(stats.p50_us), format_us(stats.p99_us), format_rate(stats.ops_per_s)]
                )
            for streams in concurrency:
                profile_to = None
                if profile and count == 1 and streams == 10:
                    profile_to = PROFILE_DIR / f"http-ttft-c10-{uuid.uuid4().hex[:6]}.txt"
                result = await chat_load(
                    server, targets[:streams], warmup=warmup, duration=duration, profile_to=profile_to
                )
                chat[(count, streams)] = result
                ttft = sorted(result["ttft_ns"])
                progress(
                    f"http: chat, {count} worker(s), {streams} streams: {len(ttft)} replies, "
                    f"first chunk p50 {format_us(percentile(ttft, 0.5) / 1000) if ttft else 'n/a'}, "
                    f"errors {result['errors']}"
                )
                if profile_to is not None and profile_to.exists():
                    summary = profile_to.with_suffix(".summary.txt")
                    summary.write_text(summarize_collapsed(profile_to))
                    progress(f"profile written to {summary}")
        finally:
            server.stop()
    origin = Server(server_environment(env), workers=1, cwd=env.workdir)
    other = Server(server_environment(env), workers=1, cwd=env.workdir)
    progress("http: resume, two servers")
    await origin.start()
    try:
        await other.start()
        resume = await resume_latency(origin, other, targets[0], 50 if quick else 300)
    finally:
        origin.stop()
        other.stop()
    progress(
        f"http: resume p50 {format_us(resume['same'].p50_us)} (same server), "
        f"{format_us(resume['other'].p50_us)} (another server, Redis)"
    )
    outcome.sections.append(_read_section(read_rows, workers))
    outcome.sections.append(_chat_section(chat, concurrency, workers, outcome.figures))
    outcome.sections.append(_resume_section(resume, outcome.figures))
    labels = {
        "begin": "`ChatService.begin`: checks, turn lock, the user's message stored, context assembled",
        "first": "to the first token (the reply's row is created before it is sent)",
        "whole": "the whole turn (reply saved, buffer updated)",
    }
    outcome.sections[-1].tables.append(
        latency_table(
            [Row(labels[k], v) for k, v in in_process.items()], first="in process, 1 stream, no HTTP", note=""
        )
    )
    outcome.figures["chat.in_process.first.p50_us"] = in_process["first"].p50_us
    return outcome


def _resume_section(resume: dict[str, Stats], figures: dict[str, float]) -> Section:
    labels = {
        "same": "on the server generating the reply (its in-process run log)",
        "other": "on another server (the reply's Redis Stream)",
    }
    for name, stats in resume.items():
        figures[f"http.resume.{name}.p50_us"] = stats.p50_us
    return Section(
        title="HTTP: resuming a reply",
        intro="Time from sending `GET /v1/conversations/{id}/messages/{message_id}/stream` with `Last-Event-ID` "
        "to receiving its first replayed event, one client on a keep-alive connection per server, two servers "
        "(one worker each) sharing the database and Redis. The scripted LLM answers at once, so most replies "
        "have ended by then: this is the replay path (goal: p50 under 20 ms with Redis).",
        tables=[latency_table([Row(labels[k], v) for k, v in resume.items()], first="resume served", note="")],
    )


def _read_section(rows: list[list[str]], workers: int) -> Section:
    tool = "wrk (2 threads, 10 connections)" if shutil.which("wrk") else "a Python httpx client (10 connections)"
    return Section(
        title="HTTP: read endpoints",
        intro=f"Load from {tool} in its own process; the server on uvicorn (httptools, uvloop) with 1 and "
        f"{workers} workers, Redis on, rate limits on (one GCRA check per request). Latency is wrk's, per request "
        "under that load.",
        tables=[Table(["endpoint", "workers", "p50", "p99", "requests/s"], rows, right={1, 2, 3, 4})],
    )


def _chat_section(
    chat: dict[tuple[int, int], dict[str, Any]],
    concurrency: tuple[int, ...],
    workers: int,
    figures: dict[str, float],
) -> Section:
    rows: list[list[str]] = []
    series: dict[str, list[float | None]] = {}
    for (count, streams), result in sorted(chat.items()):
        ttft = sorted(result["ttft_ns"])
        total = sorted(result["total_ns"])
        if not ttft:
            rows.append([str(count), str(streams), "—", "—", "—", "0", str(result["errors"])])
            continue
        p50, p99 = percentile(ttft, 0.5) / 1000, percentile(ttft, 0.99) / 1000
        rate = len(ttft) / float(result["elapsed"])
        rows.append(
            [
                str(count),
                str(streams),
                format_us(p50),
                format_us(p99),
                format_us(percentile(total, 0.5) / 1000),
                format_rate(rate),
                str(result["errors"]),
            ]
        )
        tag = "w1" if count == 1 else "wn"
        figures[f"http.ttft.{tag}.c{streams}.p50_us"] = p50
        figures[f"http.ttft.{tag}.c{streams}.p99_us"] = p99
        for name, value in ((f"p50, {count} worker(s)", p50), (f"p99, {count} worker(s)", p99)):
            series.setdefault(name, [None] * len(concurrency))[concurrency.index(streams)] = value / 1000
    return Section(
        title="HTTP: time to the first streamed chunk of a chat reply (scripted LLM)",
        intro="The scripted LLM answers at once, so the time to the first chunk (`event: token`) is the service's "
        "own overhead: authentication, rate limit, storing the user's message, context assembly, the reply's first "
        "row. Each stream is a keep-alive connection sending the next message as soon as the reply has ended "
        "(closed loop), into its own conversation; the load generator is a separate process. The guide promised "
        "3-4 s → 2-3 s to the first chunk with a real model (see the local model section for that).",
        tables=[
            Table(
                ["workers", "streams", "first chunk p50", "first chunk p99", "whole reply p50", "replies/s", "errors"],
                rows,
                right={0, 1, 2, 3, 4, 5, 6},
            )
        ],
        charts=[
            Lines(
                "http-ttft.png",
                "Time to the first streamed chunk (scripted LLM)",
                [float(c) for c in concurrency],
                series,
                "concurrent streams",
                "ms",
            )
        ],
    )
