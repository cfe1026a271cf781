"""Fixtures for the cache tests: one private `redis-server` per test process (never the shared one
on 6379), flushed before every test that uses it, and both cache backends behind one fixture."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from companion.cache.breaker import CircuitBreaker
from companion.cache.memory import MemoryBackend
from companion.cache.redis import RedisBackend
from tests.cache.helpers import BackendCase, FakeClock
from tests.support.redis_server import RedisServer
from tests.support.redis_topologies import TOPOLOGIES, backend_on, contract_backend, contract_client, prepared_topology


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """This test process's own Redis; tests may stop and restart it (always on the same port)."""
    server = RedisServer()
    assert server.port != 6379  # never the shared Redis
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """The private server, running and empty. Restarted first if an earlier test left it stopped."""
    redis_server.start()
    admin = redis_server.sync_client()
    try:
        admin.flushall()
    finally:
        admin.close()
    yield redis_server.url
    redis_server.start()


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A raw client on the private server, to look at what the backends really stored."""
    client = contract_client(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def redis_backend(redis_url: str) -> AsyncIterator[RedisBackend]:
    """A RedisBackend whose breaker runs on a fake clock (so no test waits for it to reset)."""
    backend = contract_backend(redis_url, breaker=CircuitBreaker(clock=FakeClock()))
    yield backend
    await backend.aclose()


@pytest.fixture(params=["memory", "redis", *TOPOLOGIES])
async def cache_backend(request: pytest.FixtureRequest) -> AsyncIterator[BackendCase]:
    """The same tests against both backends: MemoryBackend on a fake clock, RedisBackend on the
    private server, on the private Redis Cluster and on the private Sentinel set."""
    if request.param == "memory":
        clock = FakeClock()
        yield BackendCase(MemoryBackend(clock=clock), clock=clock)
        return
    if request.param in TOPOLOGIES:
        backend = backend_on(request.param, request, breaker=CircuitBreaker(clock=FakeClock()))
        inspector = prepared_topology(request.param, request)
        if inspector.mode == "cluster":
            await inspector.client.initialize()  # its pubsub() needs the slot map
        try:
            yield BackendCase(backend, redis=inspector.client)
        finally:
            await backend.aclose()
            await inspector.aclose()
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    url: str = request.getfixturevalue("redis_url")
    raw = contract_client(url)
    backend = contract_backend(url, breaker=CircuitBreaker(clock=FakeClock()))
    try:
        yield BackendCase(backend, redis=raw, server=server)
    finally:
        await backend.aclose()
        await raw.aclose()
