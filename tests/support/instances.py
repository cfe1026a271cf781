"""Several real app instances sharing one database and one Redis, as in a multi-instance deployment,
and helpers to read their /health and /metrics and to count the SQL statements they run."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import event

from companion.app import create_app
from companion.config import Settings
from companion.llm.scripted import ScriptedProvider
from companion.services import Services
from tests.support.live import LiveServer, wait_for

DEADLINE = 10.0


class NoDelayLiveServer(LiveServer):
    """`LiveServer` with its listening socket made as `IPPROTO_TCP`, so that asyncio turns on
    TCP_NODELAY for every accepted connection, as it does when uvicorn binds by itself. With the
    plain `socket.socket(AF_INET, SOCK_STREAM)` (proto 0) it does not, and each request after the
    first on a keep-alive connection waits ~40 ms (Nagle against the client's delayed ACK), which
    would swamp the few milliseconds an invalidation takes to travel."""

    def __init__(self, app: FastAPI) -> None:
        super().__init__(app)
        self._sock.close()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"


@asynccontextmanager
async def running_server(settings: Settings, provider: ScriptedProvider) -> AsyncIterator[LiveServer]:
    live = NoDelayLiveServer(create_app(settings, provider=provider))
    await live.start()
    try:
        yield live
    finally:
        await live.stop()


@dataclass
class Instance:
    server: LiveServer
    provider: ScriptedProvider
    http: httpx.AsyncClient  # unauthenticated: /health, /metrics

    @property
    def services(self) -> Services:
        return self.server.app.state.services  # type: ignore[no-any-return]

    @property
    def base_url(self) -> str:
        return self.server.base_url

    async def health(self) -> dict[str, Any]:
        response = await self.http.get("/health")
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    async def metrics_text(self) -> str:
        response = await self.http.get("/metrics")
        assert response.status_code == 200, response.text
        return response.text

    async def metric(self, sample: str, **labels: str) -> float:
        return metric_value(await self.metrics_text(), sample, **labels)

    async def wait_channel_connected(self, within: float = DEADLINE) -> None:
        async def connected() -> bool:
            return (await self.health())["checks"]["redis"].get("invalidation_channel") == "connected"

        await wait_for(connected, timeout=within, what=f"the invalidation channel of {self.base_url}")

    def client(self, api_key: str) -> httpx.AsyncClient:
        """A client of this instance for the user owning `api_key` (callers close it)."""
        return httpx.AsyncClient(base_url=self.base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30)


@asynccontextmanager
async def running_instances(settings: Settings, count: int = 2) -> AsyncIterator[list[Instance]]:
    """`count` app instances on their own ports with the same settings (same database and Redis)."""
    async with AsyncExitStack() as stack:
        instances = []
        for _ in range(count):
            provider = ScriptedProvider()
            server = await stack.enter_async_context(running_server(settings, provider))
            http = await stack.enter_async_context(httpx.AsyncClient(base_url=server.base_url, timeout=30))
            instances.append(Instance(server, provider, http))
        yield instances


def metric_value(text: str, sample: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when the series is not there yet)."""
    for family in text_string_to_metric_families(text):
        for item in family.samples:
            if item.name == sample and all(item.labels.get(k) == v for k, v in labels.items()):
                return float(item.value)
    return 0.0


@dataclass
class StatementLog:
    """SQL statements executed on one engine, to prove what the cache saves."""

    statements: list[str] = field(default_factory=list)

    def touching(self, *tables: str) -> list[str]:
        pattern = re.compile(r"\b(" + "|".join(map(re.escape, tables)) + r")\b", re.IGNORECASE)
        return [s for s in self.statements if pattern.search(s)]

    def clear(self) -> None:
        self.statements.clear()


@contextmanager
def statement_log(services: Services) -> Iterator[StatementLog]:
    log = StatementLog()
    engine = services.database.engine.sync_engine

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        log.statements.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield log
    finally:
        event.remove(engine, "before_cursor_execute", record)


async def served_within(
    fetch: Callable[[], Awaitable[httpx.Response]],
    predicate: Callable[[httpx.Response], bool],
    *,
    started: float | None = None,
    deadline: float = DEADLINE,
    poll_seconds: float = 0.002,
) -> float:
    """Poll `fetch` every few ms until `predicate` holds; return the seconds since `started` (a
    `loop.time()`, by default now). Fails after `deadline`, which is generous: callers assert their
    real budget on the returned figure."""
    loop = asyncio.get_running_loop()
    started = loop.time() if started is None else started
    while True:
        response = await fetch()
        if predicate(response):
            return loop.time() - started
        if loop.time() - started > deadline:
            raise AssertionError(f"not served within {deadline}s; last answer {response.status_code} {response.text}")
        await asyncio.sleep(poll_seconds)
