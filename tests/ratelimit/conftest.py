"""Fixtures for the rate-limit and quota tests: one private `redis-server` for this test process
(never the shared one on 6379), emptied before each test that uses it, and a fake clock."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from tests.conftest import run_blocking
from tests.support.redis_proc import RedisProcess


class FakeClock:
    """Wall-clock seconds that move only when told to (for `MemoryRateLimiter`)."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="session")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """This test process's own redis-server; tests may stop it, and the next test gets it back."""
    server = RedisProcess(Path(tmp_path_factory.mktemp("ratelimit-redis")))
    assert server.port != 6379, "never the shared Redis"
    run_blocking(server.start())
    yield server
    run_blocking(server.stop())


@pytest.fixture
def redis_url(private_redis: RedisProcess) -> Iterator[str]:
    """The private server, running and empty (started again if an earlier test stopped it).
    Synchronous, so that async fixtures may ask for it with `request.getfixturevalue`."""
    if not private_redis.running:
        run_blocking(private_redis.start())
    admin = redis.Redis.from_url(private_redis.url)
    try:
        admin.flushall()
    finally:
        admin.close()
    yield private_redis.url
    if not private_redis.running:
        run_blocking(private_redis.start())


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A raw client, to look at what the limiter really stored."""
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sqlite_url(sqlite_template: Path, tmp_path: Path) -> str:
    """A fresh migrated SQLite database, for tests whose subject does not depend on the database
    (request rate limits live in Redis or in process, never in SQL)."""
    path = tmp_path / "companion.db"
    shutil.copyfile(sqlite_template, path)
    return f"sqlite+aiosqlite:///{path}"


@pytest.fixture(params=["redis", "in-process"])
def limiter_mode(request: pytest.FixtureRequest) -> str:
    """Where the limits are kept: the private Redis, or this process's memory (REDIS_ENABLED=false)."""
    return str(request.param)
