"""Waiting is not an outage (issue 19): a request that cannot get a pooled database connection in
DATABASE_POOL_TIMEOUT_SECONDS is answered 503 `overloaded` with Retry-After, never "the database
is unavailable"; /health says `busy` then, and a health ping whose answer arrived while our own
event loop was blocked is not reported as a database that did not answer. A database that really
fails is still reported down (tests/test_database_outage.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import pytest
from sqlalchemy import event, text

from companion.config import Settings
from companion.errors import Overloaded, ServiceUnavailable, SettingsError
from companion.overload.loop import LoopMonitor
from companion.services import Services
from companion.storage.database import Database
from tests.conftest import make_settings
from tests.support.api import assert_error

POSTGRESQL = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)


@pytest.fixture
async def small_pool(database_url: str) -> AsyncIterator[Database]:
    # One pooled connection plus one overflow; a short pool wait so the test does not dawdle.
    database = Database(database_url, pool_size=1, pool_timeout=0.3, connect_timeout=0.2)
    yield database
    await database.dispose()


async def _hold_every_connection(database: Database, stack: AsyncExitStack) -> None:
    for _ in range(2):
        session = await stack.enter_async_context(database.session())
        await session.execute(text("SELECT 1"))  # checks a connection out and keeps it


@POSTGRESQL
async def test_a_request_that_waits_too_long_for_a_pooled_connection_is_overloaded(small_pool: Database) -> None:
    async with AsyncExitStack() as stack:
        await _hold_every_connection(small_pool, stack)
        with pytest.raises(Overloaded) as raised:
            async with small_pool.session() as session:
                await session.execute(text("SELECT 1"))
        assert raised.value.code == "overloaded" and raised.value.retry_after >= 1
        with pytest.raises(Overloaded):
            await small_pool.ping()  # busy, which /health reports as such
    assert small_pool.pool_timeouts == 2
    async with small_pool.session() as session:  # and once connections are free again, all is well
        assert (await session.execute(text("SELECT 1"))).scalar_one() == 1


@POSTGRESQL
async def test_a_ping_answered_while_our_loop_was_blocked_is_not_a_dead_database(database_url: str) -> None:
    monitor = LoopMonitor()
    monitor.start()
    database = Database(database_url, connect_timeout=0.2, pool_timeout=1.0, loop=monitor)
    loop = asyncio.get_running_loop()

    def block_when_sent(*_: object) -> None:
        # Queued as the ping's query goes out: its answer arrives while the loop is blocked.
        loop.call_soon(time.sleep, 0.6)  # deliberately blocking, three times the timeout

    try:
        await database.ping()  # a connection is open and pooled
        event.listen(database.engine.sync_engine, "before_cursor_execute", block_when_sent)
        assert await database.ping() >= 0
        assert monitor.stalled >= 0.5
    finally:
        await database.dispose()
        monitor.stop()


async def test_a_database_that_answers_nothing_is_still_reported_down() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # accepts, never answers

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    monitor = LoopMonitor()
    monitor.start()
    database = Database(
        f"postgresql+asyncpg://postgres@127.0.0.1:{port}/nothing", connect_timeout=0.2, pool_timeout=1.0, loop=monitor
    )
    try:
        with pytest.raises(ServiceUnavailable) as raised:
            await database.ping()
        assert not isinstance(raised.value, Overloaded)
    finally:
        await database.dispose()
        monitor.stop()
        server.close()
        for writer in accepted:
            writer.close()
        await server.wait_closed()


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return make_settings(
        database_url,
        tmp_path,
        database_pool_size=1,
        database_connect_timeout_seconds=0.2,
        database_pool_timeout_seconds=0.3,
    )


@POSTGRESQL
async def test_over_http_a_busy_pool_answers_overloaded_and_health_says_busy(
    client: httpx.AsyncClient, app_services: Services
) -> None:
    async with AsyncExitStack() as stack:
        await _hold_every_connection(app_services.database, stack)
        answer = await client.get("/v1/conversations")
        assert_error(answer, 503, "overloaded")
        assert int(answer.headers["retry-after"]) >= 1
        health = await client.get("/health")
        assert health.status_code == 200
        assert health.json()["checks"]["database"]["status"] == "busy"
        assert "load" in health.json()["checks"]
    health = await client.get("/health")
    assert health.json()["checks"]["database"]["status"] == "ok"


def test_the_pool_wait_must_outlast_the_connect_timeout(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="DATABASE_POOL_TIMEOUT_SECONDS"):
        make_settings(
            "sqlite+aiosqlite:///x.db",
            tmp_path,
            database_connect_timeout_seconds=5,
            database_pool_timeout_seconds=5,
        )


async def test_a_pool_timeout_raised_anywhere_is_answered_overloaded() -> None:
    from fastapi import FastAPI
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    from companion.api.errors import install_error_handlers

    app = FastAPI()
    install_error_handlers(app)

    @app.get("/busy")
    async def busy() -> None:
        raise PoolTimeout("QueuePool limit of size 10 overflow 10 reached")

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        answer = await http.get("/busy")
    assert_error(answer, 503, "overloaded")
    assert answer.headers["retry-after"] == "1"
