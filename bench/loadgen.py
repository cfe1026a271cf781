"""The chat load generator, run as its own process (`python -m bench.loadgen`) so that it never
shares a CPU budget or an event loop with the server it measures.

It reads a JSON job on stdin: {"host", "port", "streams": [{"key", "conversation"}, ...],
"warmup": seconds, "duration": seconds, "retry_after": bool (default true), "request_timeout": seconds
(default 60), "server_pid": optional}. Each stream is one keep-alive HTTP/1.1
connection sending chat messages back to back into its own conversation (turns in one conversation
are serialized by the service, so concurrent streams need their own). Per request it records the
time to the first response byte, to the first `event: token` of the SSE reply (the first streamed
chunk) and to the end of the reply. A 503 `overloaded` answer is counted as shed; with
`retry_after` the stream then waits as its Retry-After header says, as a well-behaved client does.
It writes JSON on stdout: {"ttfb_ns", "ttft_ns", "total_ns", "errors", "shed", "outcomes",
"elapsed", "completed", "window"}, for requests that started after the warm-up and before the end of
the measured window; `errors` counts every answer but a reply (shed ones included), `outcomes` each
kind of answer ("200", "503 overloaded", "503 database_unavailable", "connection", ...). `elapsed`
runs to the end of the last reply, so it includes the drain of whatever was in flight (or queued) when
the window closed; `completed` counts the replies that ended inside the window, `window` is its length:
completed / window is the throughput without that drain, which grows with the queue. With
`server_pid`, "server_cpu" is the CPU time (user + system, seconds) that process used over the window:
what a reply costs the server, whatever else the machine was doing; "loadgen_cpu" is this process's own
over the window.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections import Counter
from typing import Any

TOKEN = b"event: token"


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux /proc); None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rpartition(b")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


class Refused(Exception):
    """A complete answer other than a streamed reply: its status, error code and Retry-After."""

    def __init__(self, status: int, code: str, retry_after: float) -> None:
        super().__init__(f"HTTP {status} {code}")
        self.status, self.code, self.retry_after = status, code, retry_after

    @property
    def outcome(self) -> str:
        return f"{self.status} {self.code}".strip()


class Stream:
    def __init__(self, host: str, port: int, key: str, conversation: str) -> None:
        self.host, self.port = host, port
        self.head = (
            f"POST /v1/conversations/{conversation}/messages HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\nAccept: text/event-stream\r\n"
        ).encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def request(self, number: int) -> tuple[int, int, int]:
        """One chat turn: (ns to first byte, ns to first token, ns to the end). Raises on failure."""
        assert self.reader is not None and self.writer is not None
        body = json.dumps({"content": f"How is it going today? ({number})"}).encode()
        clock = time.perf_counter_ns
        started = clock()
        self.writer.write(self.head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        status_line = await self.reader.readline()
        first_byte = clock()
        if not status_line:
            raise ConnectionError("server closed the connection")
        status = int(status_line.split()[1])
        headers: dict[bytes, bytes] = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        first_token = 0
        if headers.get(b"transfer-encoding") == b"chunked":
            while True:
                size = int((await self.reader.readline()).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readline()
                    break
                chunk = await self.reader.readexactly(size + 2)
                if not first_token and TOKEN in chunk:
                    first_token = clock()
        else:
            body = await self.reader.readexactly(int(headers.get(b"content-length", b"0")))
            if status != 200:
                code = ""
                try:
                    code = str(json.loads(body)["error"]["code"])
                except (ValueError, KeyError, TypeError):
                    pass
                raise Refused(status, code, float(headers.get(b"retry-after", b"0") or 0))
        if status != 200 or not first_token:
            raise RuntimeError(f"HTTP {status}")
        return first_byte - started, first_token - started, clock() - started

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass


async def run(job: dict[str, Any]) -> dict[str, Any]:
    streams = [Stream(job["host"], job["port"], s["key"], s["conversation"]) for s in job["streams"]]
    await asyncio.gather(*(s.connect() for s in streams))
    loop = asyncio.get_running_loop()
    began = loop.time()
    measure_from = began + float(job["warmup"])
    stop_at = measure_from + float(job["duration"])
    ttfb: list[int] = []
    ttft: list[int] = []
    total: list[int] = []
    errors = 0
    completed = 0
    outcomes: Counter[str] = Counter()
    honor_retry_after = bool(job.get("retry_after", True))
    server_pid = job.get("server_pid")
    cpu: list[float | None] = []
    if server_pid is not None:
        for at in (measure_from, stop_at):
            loop.call_at(at, lambda: cpu.append(cpu_seconds(int(server_pid))))
    own: list[float] = []
    for at in (measure_from, stop_at):
        loop.call_at(at, lambda: own.append(time.process_time()))
    request_timeout = float(job.get("request_timeout", 60.0))

    async def drive(index: int, stream: Stream) -> None:
        nonlocal errors, completed
        number = 0
        while (now := loop.time()) < stop_at:
            number += 1
            try:
                async with asyncio.timeout(request_timeout):
                    first_byte, first_token, whole = await stream.request(index * 1_000_000 + number)
            except Refused as refused:
                if now >= measure_from:
                    errors += 1
                    outcomes[refused.outcome] += 1
                if honor_retry_after and refused.retry_after > 0:
                    await asyncio.sleep(min(refused.retry_after, max(stop_at - loop.time(), 0.0)))
                    if refused.retry_after >= 2:
                        # The server closes keep-alive connections idle for 5 s (uvicorn's default):
                        # a client coming back later opens a new one, as HTTP clients do.
                        await stream.close()
                        await stream.connect()
                continue
            except (OSError, RuntimeError, ValueError, IndexError, asyncio.IncompleteReadError) as error:
                if now >= measure_from:
                    errors += 1
                    if isinstance(error, TimeoutError):
                        outcomes["no answer in time"] += 1
                    else:
                        outcomes[str(error) if isinstance(error, RuntimeError) else "connection"] += 1
                await stream.close()
                await stream.connect()
                continue
            if measure_from <= loop.time() <= stop_at:
                completed += 1
            if now >= measure_from:
                outcomes["200"] += 1
                ttfb.append(first_byte)
                ttft.append(first_token)
                total.append(whole)

    try:
        await asyncio.gather(*(drive(i, s) for i, s in enumerate(streams)))
    finally:
        await asyncio.gather(*(s.close() for s in streams))
    start, end = [*cpu, None, None][:2]
    server_cpu = end - start if start is not None and end is not None else None
    return {
        "ttfb_ns": ttfb,
        "ttft_ns": ttft,
        "total_ns": total,
        "errors": errors,
        "shed": outcomes["503 overloaded"],
        "outcomes": dict(outcomes),
        "elapsed": loop.time() - measure_from,
        "completed": completed,
        "window": stop_at - measure_from,
        "server_cpu": server_cpu,
        "loadgen_cpu": own[1] - own[0] if len(own) == 2 else None,
    }


def main() -> None:
    job = json.load(sys.stdin)
    try:
        import uvloop

        result = uvloop.run(run(job))
    except ImportError:
        result = asyncio.run(run(job))
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
