"""Both conversation-buffer backends and both turn locks behind one fixture each, the Redis ones
on this test process's own redis-server (never the shared one)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from companion.cache.redis import RedisBackend
from companion.conversations.buffer import ConversationBuffer, MemoryConversationBuffer, RedisConversationBuffer
from tests.support.redis_server import RedisServer
from tests.support.redis_topologies import TOPOLOGIES, backend_on, contract_backend

MAX = 6


@pytest.fixture(scope="session")
def buffer_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
async def redis_backend(buffer_redis: RedisServer) -> AsyncIterator[RedisBackend]:
    buffer_redis.start()
    admin = buffer_redis.sync_client()
    admin.flushall()
    admin.close()
    backend = contract_backend(buffer_redis.url)
    yield backend
    await backend.aclose()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "redis", *TOPOLOGIES])
async def buffer(request: pytest.FixtureRequest, buffer_redis: RedisServer) -> AsyncIterator[ConversationBuffer]:
    if request.param == "memory":
        yield MemoryConversationBuffer(max_messages=MAX, ttl_seconds=3600, clock=Clock())
        return
    if request.param in TOPOLOGIES:
        on_topology = backend_on(request.param, request)
        yield RedisConversationBuffer(on_topology, max_messages=MAX, ttl_seconds=3600)
        await on_topology.aclose()
        return
    buffer_redis.start()
    backend = contract_backend(buffer_redis.url)
    await backend.client.flushall()
    yield RedisConversationBuffer(backend, max_messages=MAX, ttl_seconds=3600)
    await backend.aclose()
