"""The PostgreSQL pool pings a connection before reuse only when it sat idle (ping_after_idle_seconds),
instead of on every checkout: a connection killed while idle is replaced without the request seeing
it; one killed in the moment after its last use fails one request with a 503, and the next request
works (SQLAlchemy invalidates the pool's older connections on a disconnect)."""

from __future__ import annotations

import asyncpg
import pytest
from sqlalchemy import text

from companion.errors import ServiceUnavailable
from companion.storage.database import Database

pytestmark = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)


async def _select_one(database: Database) -> int:
    async with database.session() as session:
        return int((await session.execute(text("SELECT 1"))).scalar_one())


async def _kill_pooled_connections(database_url: str) -> int:
    admin = await asyncpg.connect(database_url.replace("+asyncpg", ""), timeout=5)
    try:
        return len(
            await admin.fetch(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() AND state = 'idle'"
            )
        )
    finally:
        await admin.close()


async def test_a_connection_killed_while_idle_is_replaced_unnoticed(database_url: str) -> None:
    database = Database(database_url, ping_after_idle_seconds=0.0)  # every reuse counts as idle
    try:
        assert await _select_one(database) == 1
        assert await _kill_pooled_connections(database_url) >= 1
        assert await _select_one(database) == 1
    finally:
        await database.dispose()


async def test_a_connection_killed_right_after_use_fails_one_request_then_recovers(database_url: str) -> None:
    database = Database(database_url, ping_after_idle_seconds=3600.0)  # never pinged
    try:
        assert await _select_one(database) == 1
        assert await _kill_pooled_connections(database_url) >= 1
        with pytest.raises(ServiceUnavailable):
            await _select_one(database)
        assert await _select_one(database) == 1
    finally:
        await database.dispose()


@pytest.mark.parametrize(("idle_seconds", "pings"), [(3600.0, 0), (0.0, 4)], ids=["busy", "idle"])
async def test_only_a_connection_idle_past_the_threshold_is_pinged(
    database_url: str, monkeypatch: pytest.MonkeyPatch, idle_seconds: float, pings: int
) -> None:
    database = Database(database_url, ping_after_idle_seconds=idle_seconds)
    dialect = database.engine.sync_engine.dialect
    calls: list[object] = []
    do_ping = dialect.do_ping

    def counting(dbapi_connection: object) -> bool:
        calls.append(dbapi_connection)
        return do_ping(dbapi_connection)

    monkeypatch.setattr(dialect, "do_ping", counting)
    try:
        for _ in range(5):
            await _select_one(database)  # one pooled connection, reused four times
        assert len(calls) == pings
    finally:
        await database.dispose()
