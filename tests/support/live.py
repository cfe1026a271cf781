"""A real uvicorn server on a loopback port, in the test's own event loop, and SSE parsing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI


class _Server(uvicorn.Server):
    """uvicorn without its signal handling: in tests the server is a task in pytest's loop, and
    restoring "previous" handlers could leave a finished loop's Ctrl-C handler installed."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class LiveServer:
    def __init__(self, app: FastAPI, **options: Any) -> None:
        self.app = app
        # IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on sockets that say so.
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        # As `companion serve` runs it: uvicorn never rewrites the client address from headers
        # (companion/cli/main.py:server_options); `options` may override.
        config = uvicorn.Config(
            app,
            **{"lifespan": "on", "log_level": "warning", "ws": "none", "access_log": False, "proxy_headers": False}
            | options,
        )
        self._server = _Server(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self._sock]))
        await wait_for(lambda: self._server.started or self._task.done(), what="uvicorn to start")  # type: ignore[union-attr]
        if self._task.done():
            self._task.result()  # surfaces the start-up error

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await self._task
        self._sock.close()


async def wait_for(
    condition: Callable[[], bool | Awaitable[bool]],
    *,
    timeout: float = 10.0,  # noqa: ASYNC109 - a polling deadline for tests, not a cancellation scope
    what: str = "condition",
) -> None:
    """Poll `condition` until it holds, failing after `timeout` seconds: no sleep-and-hope."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result) or isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


@dataclass
class SSEEvent:
    event: str | None
    data: str
    id: str | None = None

    def json(self) -> Any:
        return json.loads(self.data)


async def iter_sse(response: httpx.Response) -> AsyncIterator[SSEEvent]:
    """Parse a text/event-stream response incrementally, one event as soon as it is complete."""
    event: str | None = None
    event_id: str | None = None
    data: list[str] = []
    async for line in response.aiter_lines():
        if line == "":
            if data:
                yield SSEEvent(event, "\n".join(data), event_id)
            event, event_id, data = None, None, []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("id:"):
            event_id = line[3:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip(" "))
