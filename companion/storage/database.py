"""The async engine and unit-of-work sessions, for SQLite (aiosqlite) and PostgreSQL (asyncpg).

SQLite runs in WAL mode with a busy timeout, and every transaction starts with BEGIN IMMEDIATE: a
deferred transaction that reads and then writes can fail at once with "database is locked" whatever
the busy timeout, while an immediate one waits its turn. Errors that mean "the database cannot be
reached" are mapped to `ServiceUnavailable` (HTTP 503) in one place, `session()`.

Waiting is not an outage: a request that waits longer than `pool_timeout` for a pooled connection
(every one busy) gets `Overloaded` (503 `overloaded`, Retry-After), and the pool's wait is its own
setting, longer than the connect timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event, exc, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from companion.errors import Overloaded, ServiceUnavailable
from companion.overload.loop import LagTolerantTimeout, LoopMonitor

# Errors that say the server is gone or overloaded, not that the query was wrong.
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    exc.OperationalError,
    exc.InterfaceError,
    exc.TimeoutError,
    TimeoutError,
    ConnectionError,
    OSError,
)


# SQLSTATE classes that mean "cannot use this server now": connection exceptions, a missing
# database or role, failed authentication, server shutting down or out of resources.
_UNAVAILABLE_SQLSTATES = ("08", "3D000", "28", "57P", "53")


def _is_unavailable(error: BaseException) -> bool:
    if isinstance(error, exc.DBAPIError):
        if error.connection_invalidated:
            return True
        sqlstate = getattr(error.orig, "pgcode", None) or getattr(error.orig, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate.startswith(_UNAVAILABLE_SQLSTATES):
            return True
    return isinstance(error, UNAVAILABLE_ERRORS)


class Database:
    """Owns the engine; hands out sessions that commit on success and roll back on error."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float = 3.0,
        pool_size: int = 10,
        pool_timeout: float | None = None,
        sqlite_busy_timeout_ms: int = 5000,
        ping_after_idle_seconds: float = 1.0,
        echo: bool = False,
        loop: LoopMonitor | None = None,
        hide_parameters: bool = True,
    ) -> None:
        self.url = url
        parsed = make_url(url)
        self.dialect = parsed.get_backend_name()
        self.connect_timeout = connect_timeout
        self.pool_timeout = pool_timeout if pool_timeout is not None else max(connect_timeout * 3, 10.0)
        self.loop = loop
        self.pool_timeouts = 0  # requests answered `overloaded` because no pooled connection came in time
        # Statement parameters are what users wrote (messages, memories): an error's text (and so any
        # log of it) leaves them out unless debug logging is asked for (LOG_LEVEL=DEBUG).
        kwargs: dict[str, Any] = {"echo": echo, "hide_parameters": hide_parameters}
        if self.dialect == "sqlite":
            database = parsed.database
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": sqlite_busy_timeout_ms / 1000}
        else:
            kwargs.update(
                pool_size=pool_size,
                max_overflow=pool_size,
                # The wait for a pooled connection when all are busy: overload, not an outage.
                pool_timeout=self.pool_timeout,
                # Not SQLAlchemy's pool_pre_ping, which pings on every checkout: a third of the cost
                # of a one-statement session (docs/benchmarks.md). _ping_when_idle pings only a
                # connection that sat unused for a while, the one a server restart would have killed.
                # A server that accepts but never answers must not hold a request for long.
                connect_args={"timeout": connect_timeout, "command_timeout": max(connect_timeout * 3, 5.0)},
            )
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        if self.dialect == "sqlite":
            _configure_sqlite(self.engine, sqlite_busy_timeout_ms)
        else:
            _ping_when_idle(self.engine, ping_after_idle_seconds)
        self.sessionmaker = async_sessionmaker(self.engine, expire_on_commit=False)
        self.queries = 0  # statements executed; tests use it to prove what the cache saves
        event.listen(self.engine.sync_engine, "before_cursor_execute", self._count)

    def _count(self, *_: Any) -> None:
        self.queries += 1

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A unit of work: commits when the block ends normally, rolls back otherwise.

        Raises `ServiceUnavailable` when the database cannot be reached or does not answer in time.
        """
        try:
            async with self.sessionmaker() as session:
                try:
                    yield session
                    await session.commit()
                except BaseException:
                    await session.rollback()
                    raise
        except ServiceUnavailable:
            raise
        except exc.TimeoutError as error:
            # Only the pool raises SQLAlchemy's TimeoutError: every connection was in use for the
            # whole of pool_timeout. The database is fine; this worker is busy.
            self.pool_timeouts += 1
            raise Overloaded("The server is busy right now; retry in a moment.", retry_after=1) from error
        except BaseException as error:
            if _is_unavailable(error) and not isinstance(error, asyncio.CancelledError):
                raise ServiceUnavailable("The database is unavailable right now; retry in a few seconds.") from error
            raise

    async def ping(self) -> float:
        """Round-trip a trivial query; return its latency in ms.

        Raises ServiceUnavailable only on evidence that the database is down: a failed connect or
        query, or no answer within the connect timeout of loop time (our own stalled event loop does
        not count against it). Raises Overloaded when every pooled connection stayed busy for the
        pool timeout: busy, not down."""
        started = time.perf_counter()
        try:
            async with self.engine.connect() as connection:
                async with LagTolerantTimeout(self.loop, self.connect_timeout, cap=self.pool_timeout):
                    await connection.execute(text("SELECT 1"))
        except exc.TimeoutError as error:
            self.pool_timeouts += 1
            raise Overloaded("The server is busy right now; retry in a moment.", retry_after=1) from error
        except TimeoutError as error:
            raise ServiceUnavailable("The database did not answer in time.") from error
        except asyncio.CancelledError:
            raise
        except BaseException as error:
            if _is_unavailable(error):
                raise ServiceUnavailable("The database is unavailable right now.") from error
            raise
        return (time.perf_counter() - started) * 1000

    async def dispose(self) -> None:
        await self.engine.dispose()


def _ping_when_idle(engine: AsyncEngine, idle_seconds: float) -> None:
    """Ping a pooled connection before handing it out only if it was idle for `idle_seconds`. A
    connection that dies while in use (or in the moments between uses) fails its statement as a
    disconnect, which SQLAlchemy turns into invalidating every connection of the pool made before
    then: the request gets its 503 and the next one reconnects."""
    pool = engine.sync_engine.pool
    dialect = engine.sync_engine.dialect

    @event.listens_for(pool, "checkin")
    def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(pool, "checkout")
    def _on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since < idle_seconds:
            return  # new, or in use a moment ago
        try:
            dialect.do_ping(dbapi_connection)
        except Exception as error:
            # The pool discards this connection and checks out (or opens) another.
            raise exc.DisconnectionError("stale pooled connection") from error


def _configure_sqlite(engine: AsyncEngine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let us issue BEGIN ourselves (see the module docstring).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")
