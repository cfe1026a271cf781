"""Shared fixtures. Every database-backed test runs against SQLite and the real PostgreSQL
(parametrized through `settings`); nothing is mocked. A skipped test fails the run, and under
`.ci/run` so does any test that was deselected or never collected (tests/support/strict_run.py)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from companion.app import create_app
from companion.config import Settings, load_settings
from companion.llm.scripted import ScriptedProvider
from companion.services import Services
from companion.storage import migrate
from companion.storage.database import Database
from tests.support.live import LiveServer
from tests.support.redis_topologies import LocalCluster, LocalSentinelSet

PG_ADMIN_DSN = os.environ.get("COMPANION_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
# `pytester` runs small pytest sessions in a test, to check the strict-run plugin itself.
pytest_plugins = ["pytester", "tests.support.strict_run"]

TABLES = "memories, conversation_summaries, messages, conversations, preferences, personalities, api_keys, users"


def _pg_url(database: str) -> str:
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    return f"{base}/{database}"


async def _create_pg_database(name: str) -> None:
    connection = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()


async def _drop_pg_database(name: str) -> None:
    connection = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


async def _migrate(url: str) -> None:
    database = Database(url)
    try:
        await migrate.upgrade(database)
    finally:
        await database.dispose()


def run_blocking(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run set-up coroutines from sync session fixtures, even when a test's loop is running."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """One PostgreSQL database for this test process, migrated once, dropped at the end."""
    name = f"companion_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    try:
        run_blocking(_create_pg_database(name))
    except (OSError, asyncpg.PostgresError) as error:
        pytest.fail(f"PostgreSQL is required for these tests and is not reachable ({error}); start it (.ci/run does).")
    url = _pg_url(name)
    run_blocking(_migrate(url))
    yield url
    run_blocking(_drop_pg_database(name))


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file, copied for each test (faster than migrating each time)."""
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    run_blocking(_migrate(f"sqlite+aiosqlite:///{path}"))
    return path


# --- Redis Cluster and Sentinel (tests/support/redis_topologies.py) --------------------------------
# Started once per test process, on first use, and left whole for the next test (a test that kills
# a node heals the topology before it ends); every test empties them with `.flush()` first.


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A private 6-node Redis Cluster: 3 primaries, 3 replicas."""
    cluster = _started(lambda: LocalCluster(tmp_path_factory.mktemp("redis-cluster")))
    try:
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture(scope="session")
def redis_sentinels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSentinelSet]:
    """A private Sentinel set: 1 primary, 1 replica, 3 sentinels."""
    sentinels = _started(lambda: LocalSentinelSet(tmp_path_factory.mktemp("redis-sentinel")))
    try:
        yield sentinels
    finally:
        sentinels.cleanup()


def _started(make: Callable[[], Any], attempts: int = 3) -> Any:
    """Start a set of redis-server processes on free ports, on new ports again if another process
    took one of them between our check and the server's bind (other test runs share the machine)."""
    for attempt in range(attempts):
        topology = make()
        try:
            topology.start()
            return topology
        except RuntimeError as error:
            topology.cleanup()
            if "Address already in use" not in str(error) or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def make_settings(database_url: str, tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "database_url": database_url,
        "data_dir": tmp_path,
        "llm_provider": "scripted",
        "auto_migrate": False,
        "environment": "test",
        "redis_enabled": False,
        # Tests make many requests from one address; the rate-limit tests turn limits on themselves.
        "rate_limit_enabled": False,
        # A shared two-core machine can stall any request; the deadline's own test sets it low.
        "memory_retrieval_deadline_ms": 10_000,
    }
    values.update(overrides)
    return load_settings(**values)


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def database_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A clean, migrated database for one test."""
    if backend == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        path = tmp_path / "companion.db"
        shutil.copyfile(template, path)
        yield f"sqlite+aiosqlite:///{path}"
        return
    url: str = request.getfixturevalue("pg_database")
    connection = await asyncpg.connect(url.replace("+asyncpg", ""), timeout=5)
    try:
        await connection.execute(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
    finally:
        await connection.close()
    yield url


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return make_settings(database_url, tmp_path)


@pytest.fixture
def provider() -> ScriptedProvider:
    return ScriptedProvider()


@pytest.fixture
async def services(settings: Settings, provider: ScriptedProvider) -> AsyncIterator[Services]:
    """The service container without HTTP, started as the app would start it."""
    built = Services.build(settings, provider=provider)
    await built.start()
    yield built
    await built.aclose()


@pytest.fixture
async def server(settings: Settings, provider: ScriptedProvider) -> AsyncIterator[LiveServer]:
    """The real app on uvicorn, on a loopback port."""
    live = LiveServer(create_app(settings, provider=provider))
    await live.start()
    yield live
    await live.stop()


@pytest.fixture
def app_services(server: LiveServer) -> Services:
    return server.app.state.services  # type: ignore[no-any-return]


@pytest.fixture
async def api_key(app_services: Services) -> str:
    return (await app_services.users.create("alice")).api_key


@pytest.fixture
async def client(server: LiveServer, api_key: str) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client authenticated as a fresh user."""
    async with httpx.AsyncClient(
        base_url=server.base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30
    ) as http:
        yield http


@pytest.fixture
async def anon(server: LiveServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
        yield http


async def new_client(server: LiveServer, name: str = "bob") -> httpx.AsyncClient:
    """Another user's client (callers close it)."""
    services: Services = server.app.state.services
    key = (await services.users.create(name)).api_key
    return httpx.AsyncClient(base_url=server.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
