"""A Redis that stalls (up, connections open, but answering nothing: slower than the 250 ms socket
timeout) rather than going away: requests keep being served from the database, the circuit breaker
opens and /health says so, an edit made meanwhile is served at once, and when Redis answers again
the breaker closes by itself, the invalidations it missed are replayed and nothing stale is served.
The stall is a TCP proxy in front of a private redis-server that holds every byte (tests/support/
tcp_proxy.py); what it held is delivered late when it resumes, as a busy server would still run it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from tests.conftest import make_settings
from tests.support.api import chat, create_conversation, create_personality
from tests.support.instances import DEADLINE, Instance, running_instances
from tests.support.live import wait_for
from tests.support.redis_proc import RedisProcess, running_redis
from tests.support.tcp_proxy import TcpProxy

TEST_BUDGET = 90.0  # a hang fails the test instead of stalling the run


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisProcess]:
    async with running_redis(tmp_path / "redis") as server:
        yield server


@pytest.fixture
async def proxy(redis_server: RedisProcess) -> AsyncIterator[TcpProxy]:
    tcp = TcpProxy(redis_server.port)
    await tcp.start()
    yield tcp
    tcp.resume()
    await tcp.stop()


async def redis_check(instance: Instance) -> dict[str, object]:
    return (await instance.health())["checks"]["redis"]  # type: ignore[no-any-return]


async def test_a_stalled_redis_trips_the_breaker_and_everything_recovers_when_it_answers_again(
    database_url: str, tmp_path: Path, proxy: TcpProxy
) -> None:
    settings = make_settings(
        database_url,
        tmp_path,
        redis_enabled=True,
        redis_url=f"redis://127.0.0.1:{proxy.port}/0",
        redis_breaker_failures=3,
        redis_breaker_reset_seconds=0.5,  # a trial call twice a second: recovery is quick to see
    )
    async with asyncio.timeout(TEST_BUDGET), running_instances(settings, count=1) as (a,), AsyncExitStack() as stack:
        await a.wait_channel_connected()
        client = await stack.enter_async_context(a.client((await a.services.users.create("alice")).api_key))
        await create_personality(client, "quill", system_prompt="You are Quill, version one.")
        conversation = await create_conversation(client, "quill")
        await chat(client, conversation["id"], "Hello before the stall")
        redis = a.services.redis
        assert redis is not None and redis.breaker.state == "closed"
        outages = redis.breaker.outages

        proxy.stall()
        # Requests that need Redis (a personality not cached yet, a chat turn with its buffer and
        # turn lock, an edit with its invalidation) are all served, by the database.
        assert (await client.get("/v1/personalities/orion")).status_code == 200
        done = await chat(client, conversation["id"], "Hello during the stall")
        assert done["content"] == "You said: Hello during the stall"
        patched = await client.patch("/v1/personalities/quill", json={"system_prompt": "You are Quill, version two."})
        assert patched.status_code == 200, patched.text
        assert (await client.get("/v1/personalities/quill")).json()["system_prompt"] == "You are Quill, version two."

        async def breaker_opened() -> bool:
            await client.get("/v1/personalities/lyra")  # another call that would need Redis
            return redis.breaker.outages > outages

        await wait_for(breaker_opened, timeout=DEADLINE, what="the breaker to open on a stalled Redis")
        health = await a.http.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "degraded", health.text
        assert health.json()["checks"]["redis"]["status"] == "down"
        assert await a.metric("companion_redis_degraded") == 1
        # While it is open, requests still work (and do not queue behind the stalled Redis).
        done = await chat(client, conversation["id"], "Still there?")
        assert done["content"] == "You said: Still there?"

        proxy.resume()

        async def recovered() -> bool:
            check = await redis_check(a)
            return check["status"] == "ok" and check["circuit"] == "closed" and check["pending_invalidations"] == 0

        await wait_for(recovered, timeout=DEADLINE, what="Redis to be ok again, the breaker closed")
        assert redis.breaker.state == "closed"
        assert (await a.http.get("/health")).json()["status"] == "ok"
        assert await a.metric("companion_redis_degraded") == 0
        # Nothing stale: the edit made during the stall is what is served, from the cache again.
        for _ in range(3):
            served = await client.get("/v1/personalities/quill")
            assert served.json()["system_prompt"] == "You are Quill, version two.", served.text
        done = await chat(client, conversation["id"], "And after it?")
        assert a.provider.prompts[-1][0].content.startswith("You are Quill, version two.")
        history = (await client.get(f"/v1/conversations/{conversation['id']}/messages")).json()["data"]
        assert [m["content"] for m in history if m["role"] == "user"] == [
            "Hello before the stall",
            "Hello during the stall",
            "Still there?",
            "And after it?",
        ]
        assert [m.content for m in a.provider.prompts[-1][1:] if m.role == "user"] == [
            "Hello before the stall",
            "Hello during the stall",
            "Still there?",
            "And after it?",
        ]
