"""PostgreSQL going away and coming back, through a TCP proxy the test can cut: requests answer a
prompt 503 (never hang), /health says so without leaking the connection string, a stream in flight
ends cleanly, and the service recovers by itself once the database is back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import asyncpg
import httpx
import pytest
from prometheus_client import generate_latest
from sqlalchemy.engine import make_url

from companion.api.metrics import build_registry
from companion.config import Settings
from companion.llm.scripted import ScriptedProvider, ScriptedReply
from companion.services import Services
from tests.conftest import TABLES, make_settings
from tests.support.api import assert_error, create_conversation, running_server, user_client
from tests.support.instances import metric_value
from tests.support.live import LiveServer, SSEEvent, iter_sse, wait_for
from tests.support.tcp_proxy import TcpProxy

DEADLINE = 10.0
ANSWER_WITHIN = 5.0  # an outage must be reported within this, not hang (a no-hang bound, not a benchmark)
SECRET = "not-the-real-password-7f3a"  # trust auth never asks for it; it must never be shown


@pytest.fixture
async def proxy(pg_database: str) -> AsyncIterator[TcpProxy]:
    target = make_url(pg_database)
    tcp = TcpProxy(target.port or 5432, target_host=target.host or "127.0.0.1")
    await tcp.start()
    yield tcp
    await tcp.stop()


@pytest.fixture
async def outage_settings(pg_database: str, proxy: TcpProxy, tmp_path: Path) -> Settings:
    connection = await asyncpg.connect(pg_database.replace("+asyncpg", ""), timeout=5)
    try:
        await connection.execute(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
    finally:
        await connection.close()
    url = make_url(pg_database).set(host="127.0.0.1", port=proxy.port, password=SECRET)
    return make_settings(url.render_as_string(hide_password=False), tmp_path, database_connect_timeout_seconds=1)


@pytest.fixture
async def outage_server(outage_settings: Settings, provider: ScriptedProvider) -> AsyncIterator[LiveServer]:
    async with running_server(outage_settings, provider) as live:
        yield live


@pytest.fixture
async def client(outage_server: LiveServer) -> AsyncIterator[httpx.AsyncClient]:
    async with user_client(outage_server, "alice") as http:
        yield http


async def timed(request: Awaitable[httpx.Response]) -> tuple[httpx.Response, float]:
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(DEADLINE):
        response = await request
    return response, loop.time() - started


def assert_no_secrets(text: str, settings: Settings, proxy: TcpProxy) -> None:
    url = make_url(settings.resolved_database_url)
    for secret in (SECRET, "postgresql", "asyncpg", str(url.database), f":{proxy.port}", "127.0.0.1"):
        assert secret not in text, (secret, text)


async def test_requests_answer_503_while_the_database_is_down_and_recover_by_themselves(
    outage_server: LiveServer, client: httpx.AsyncClient, proxy: TcpProxy, outage_settings: Settings
):
    conversation = await create_conversation(client)
    assert (await client.get("/v1/conversations")).status_code == 200
    healthy = await client.get("/health")
    assert healthy.status_code == 200 and healthy.json()["checks"]["database"]["status"] == "ok"

    await proxy.stop()

    for path in ("/v1/conversations", f"/v1/conversations/{conversation['id']}/messages"):
        response, elapsed = await timed(client.get(path))
        error = assert_error(response, 503, "database_unavailable")
        assert int(response.headers["retry-after"]) > 0
        assert elapsed < ANSWER_WITHIN, f"{path} took {elapsed:.1f}s to report the outage"
        assert_no_secrets(response.text, outage_settings, proxy)
        assert error["type"] == "service_unavailable"

    # A write is refused the same way, before anything half-happens.
    response, elapsed = await timed(
        client.post(f"/v1/conversations/{conversation['id']}/messages", json={"content": "Hello?", "stream": False})
    )
    assert_error(response, 503, "database_unavailable")
    assert elapsed < ANSWER_WITHIN

    health, elapsed = await timed(client.get("/health"))
    assert elapsed < ANSWER_WITHIN
    assert health.status_code == 503
    body = health.json()
    assert body["status"] == "degraded"
    assert body["checks"]["database"]["status"] == "down"
    assert body["checks"]["database"]["backend"] == "postgresql"
    assert_no_secrets(health.text.replace('"postgresql"', '"backend"'), outage_settings, proxy)

    await proxy.start()

    async def conversations_answer() -> bool:
        return (await client.get("/v1/conversations")).status_code == 200

    await wait_for(conversations_answer, timeout=DEADLINE, what="requests to succeed again")
    listed = (await client.get("/v1/conversations")).json()
    assert [c["id"] for c in listed["data"]] == [conversation["id"]]
    health = await client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    # The message refused during the outage was not stored.
    messages = await client.get(f"/v1/conversations/{conversation['id']}/messages")
    assert messages.status_code == 200 and messages.json()["data"] == []


async def test_a_stream_in_flight_ends_when_the_database_goes_away(
    outage_server: LiveServer, client: httpx.AsyncClient, proxy: TcpProxy, provider: ScriptedProvider
):
    gate = asyncio.Semaphore(0)
    provider.queue(ScriptedReply("The database will vanish before this reply ends", gate=gate))
    conversation = await create_conversation(client)

    request = client.build_request(
        "POST", f"/v1/conversations/{conversation['id']}/messages", json={"content": "Talk to me"}
    )
    gate.release()
    async with asyncio.timeout(DEADLINE):
        response = await client.send(request, stream=True)
    try:
        assert response.status_code == 200
        events = iter_sse(response)
        async with asyncio.timeout(DEADLINE):
            assert (await anext(events)).event == "message"
            assert (await anext(events)).json() == {"text": "The "}

        await proxy.stop()
        for _ in range(20):
            gate.release()
        async with asyncio.timeout(DEADLINE):  # the stream ends; it does not hang
            rest: list[SSEEvent] = [event async for event in events]
    finally:
        await response.aclose()
    # The client is told why the reply stopped: tokens, then one error event, and never "done".
    assert rest, "the stream ended without telling the client why"
    *tokens, last = rest
    assert all(event.event == "token" for event in tokens), rest
    assert last.event == "error", rest
    assert last.json()["error"]["code"] == "database_unavailable"
    assert last.json()["error"]["type"] == "service_unavailable"
    streamed = "The " + "".join(event.json()["text"] for event in tokens)
    assert "The database will vanish before this reply ends".startswith(streamed), streamed

    # The server is still up and comes back with the database.
    await proxy.start()

    async def conversations_answer() -> bool:
        return (await client.get("/v1/conversations")).status_code == 200

    await wait_for(conversations_answer, timeout=DEADLINE, what="requests to succeed again")
    provider.queue("Back again.")
    response = await client.post(
        f"/v1/conversations/{conversation['id']}/messages", json={"content": "Still there?", "stream": False}
    )
    assert response.status_code == 200, response.text
    assert response.json()["content"] == "Back again."


async def test_a_recall_whose_database_read_fails_lets_the_reply_go_ahead_and_is_counted_as_failed(
    outage_settings: Settings, proxy: TcpProxy
):
    """The memory read of a recall fails (the database went away): the recall returns nothing at
    once instead of raising, and /metrics counts it as outcome="failed", not as a timeout."""
    writer = Services.build(outage_settings, provider=ScriptedProvider())
    await writer.start()
    try:
        user = (await writer.users.create("alice")).id
        await writer.memories.add(user, "My sister Ana lives in Berlin.")
        generation = await writer.memories.store.generation(user)
    finally:
        await writer.aclose()
    # A fresh instance: nothing of this user's memories is loaded yet, so a recall must read them.
    services = Services.build(outage_settings, provider=ScriptedProvider())
    await services.start()
    try:

        def recalls(outcome: str) -> float:
            text = generate_latest(build_registry(services)).decode()
            return metric_value(text, "companion_memory_recalls_total", outcome=outcome)

        await proxy.stop()
        # As a chat turn calls it (the generation read with the message) and on its own.
        for kwargs in ({"generation": generation}, {}):
            async with asyncio.timeout(ANSWER_WITHIN):
                assert await services.memories.recall(user, "Where does my sister live?", **kwargs) == []
        assert services.memories.stats.recall_failures == 2
        assert (recalls("failed"), recalls("timeout"), recalls("ok")) == (2, 0, 0)

        await proxy.start()

        async def recalled_again() -> bool:
            found = await services.memories.recall(user, "Tell me about my sister.")
            return "My sister Ana lives in Berlin." in [m.text for m in found]

        await wait_for(recalled_again, timeout=DEADLINE, what="recalls to succeed again")
        assert recalls("failed") == 2 and recalls("ok") >= 1
    finally:
        await proxy.start()
        await services.aclose()
