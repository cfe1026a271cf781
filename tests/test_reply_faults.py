"""The fault test of reply runs: 50 replies on two servers sharing PostgreSQL and Redis, clients that
drop their connection at random and resume through the other server, and one server killed in the
middle of it all. Every client ends with the reply's final event, its assembled text is the stored
reply, no reply is left `streaming`, and no message is lost.

Server A is "killed" by cutting, at once, every connection it has: to its clients (its HTTP port is
behind a TCP proxy), to PostgreSQL and to Redis (also behind proxies). From then on nothing it does
reaches anyone, as after a SIGKILL; it is abandoned and only stopped at the end of the test."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from sqlalchemy.engine import make_url

from companion.config import Settings
from companion.llm.base import ChatMessage, Chunk, GenerationParams
from companion.llm.scripted import ScriptedProvider
from tests.conftest import TABLES, make_settings
from tests.support.instances import running_server
from tests.support.live import LiveServer, iter_sse
from tests.support.redis_proc import running_redis
from tests.support.tcp_proxy import TcpProxy

REPLIES = 50
CONCURRENCY = 10
DEADLINE = 120.0
WORDS = "the fox and the crow talked about cheese and trust until the sun came up over the hill".split()


class PacedProvider(ScriptedProvider):
    """A model that takes its time: a reply of about 40 words, one every 10 ms."""

    async def stream(self, messages: Sequence[ChatMessage], params: GenerationParams) -> AsyncIterator[Chunk]:
        seed = messages[-1].content
        rng = random.Random(seed)
        words = [rng.choice(WORDS) for _ in range(rng.randint(20, 60))]
        words[0] = f"[{seed}]"
        for word in words:
            await asyncio.sleep(0.01)  # the model's pace, not a wait for a condition
            yield Chunk(text=word + " ")
        yield Chunk(finish_reason="stop")


@dataclass
class Outcome:
    conversation_id: str
    message_id: int | None = None
    text: str = ""
    final: dict[str, Any] | None = None
    final_kind: str | None = None
    resumes: int = 0
    through_a: bool = False  # it was streaming from A at some point
    notes: list[str] = field(default_factory=list)


async def test_fifty_replies_survive_disconnects_resumes_and_a_killed_server(pg_database: str, tmp_path: Path):
    connection = await asyncpg.connect(pg_database.replace("+asyncpg", ""), timeout=5)
    try:
        await connection.execute(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
    finally:
        await connection.close()
    target = make_url(pg_database)
    rng = random.Random(14)
    async with running_redis(tmp_path / "redis") as redis_server:
        pg_proxy = TcpProxy(target.port or 5432, target_host=target.host or "127.0.0.1")
        redis_proxy = TcpProxy(redis_server.port)
        await pg_proxy.start()
        await redis_proxy.start()
        common: dict[str, Any] = {
            "redis_enabled": True,
            "reply_heartbeat_seconds": 0.2,
            "reply_stale_seconds": 1.5,
            "database_connect_timeout_seconds": 1,
            # A turn A began but never stored (it died between taking the conversation and committing
            # the message) holds the conversation until its Redis lease expires (30 s): a message sent
            # again through B waits for that.
            "turn_wait_seconds": 45,
        }
        settings_a = make_settings(
            make_url(pg_database).set(port=pg_proxy.port).render_as_string(hide_password=False),
            tmp_path / "a",
            redis_url=f"redis://127.0.0.1:{redis_proxy.port}/0",
            **common,
        )
        settings_b = make_settings(pg_database, tmp_path / "b", redis_url=redis_server.url, **common)
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        async with running_server(settings_a, PacedProvider()) as a, running_server(settings_b, PacedProvider()) as b:
            http_proxy = TcpProxy(a.port)
            await http_proxy.start()
            try:
                await _run(a, b, http_proxy, [pg_proxy, redis_proxy], settings_b, rng)
            finally:
                await http_proxy.stop()
                await pg_proxy.stop()
                await redis_proxy.stop()


async def _run(
    a: LiveServer, b: LiveServer, http_proxy: TcpProxy, backends: list[TcpProxy], settings: Settings, rng: random.Random
) -> None:
    keys = [(await b.app.state.services.users.create(f"user{i}")).api_key for i in range(5)]
    url_a, url_b = f"http://127.0.0.1:{http_proxy.port}", b.base_url
    killed = asyncio.Event()
    started = 0
    outcomes: list[Outcome] = []
    slots = asyncio.Semaphore(CONCURRENCY)

    async def one(index: int) -> None:
        nonlocal started
        async with slots:
            key = keys[index % len(keys)]
            plan = rng.random(), rng.randint(1, 25), rng.random()
            async with (
                httpx.AsyncClient(base_url=url_a, headers={"Authorization": f"Bearer {key}"}, timeout=10) as on_a,
                httpx.AsyncClient(base_url=url_b, headers={"Authorization": f"Bearer {key}"}, timeout=10) as on_b,
            ):
                created = await on_b.post("/v1/conversations", json={"personality": "elara"})
                assert created.status_code == 201, created.text
                outcome = Outcome(created.json()["id"])
                outcomes.append(outcome)
                started += 1
                if started == REPLIES // 2:
                    asyncio.get_running_loop().call_later(0.3, lambda: asyncio.ensure_future(kill()))
                first = on_a if plan[0] < 0.5 and not killed.is_set() else on_b
                await _converse(outcome, first, on_a, on_b, f"reply {index}", plan[1], plan[2] < 0.5, killed)

    async def kill() -> None:
        # Clients first, then the database and Redis: as after SIGKILL, nothing A does arrives anywhere.
        await http_proxy.stop()
        await asyncio.gather(*(proxy.stop() for proxy in backends))
        killed.set()

    async with asyncio.timeout(DEADLINE):
        await asyncio.gather(*(one(index) for index in range(REPLIES)))
    assert killed.is_set()

    # Every client ended with the reply's final event, and its text is the stored reply.
    services = b.app.state.services
    async with httpx.AsyncClient(base_url=url_b, timeout=10) as anon:
        assert (await anon.get("/health")).status_code == 200
    lost = 0
    ahead: list[int] = []  # characters a client of the killed server had beyond the saved text
    stored_by_id = {}
    for outcome in outcomes:
        if "unanswered" in outcome.notes:
            continue  # its message is stored (checked above); A died before the reply's first token
        assert outcome.final is not None, outcome
        assert outcome.message_id is not None, outcome
        stored = await services.conversations.message(outcome.message_id)
        if stored is None:
            lost += 1
            continue
        stored_by_id[stored.id] = stored
        assert stored.status != "streaming"
        if outcome.final_kind == "done":
            assert outcome.final["content"] == stored.content == outcome.text
            continue
        # Its server was killed mid-reply: the final event carries the text kept. A client that was
        # streaming from that server may have had a little more than was saved before the kill (its
        # last flush interval): then what it had starts with the stored reply, and it is told so.
        assert outcome.final["error"]["code"] == "reply_interrupted", outcome.final
        assert stored.status == "incomplete"
        assert outcome.final["content"] == stored.content
        if outcome.text != stored.content:
            assert outcome.text.startswith(stored.content), (outcome, stored.content)
            assert outcome.through_a, outcome  # only a client of the killed server can be ahead
            ahead.append(len(outcome.text) - len(stored.content))
    assert lost == 0
    # Nothing anywhere is left streaming, and every user message has its reply, except where A died
    # holding it: a message A stored but died before answering, or stored just as its connections
    # were cut (its client could not know, and sent it again through B: at least once).
    conn = await asyncpg.connect(settings.resolved_database_url.replace("+asyncpg", ""), timeout=5)
    try:
        streaming = await conn.fetchval("SELECT count(*) FROM messages WHERE status = 'streaming'")
        rows = await conn.fetch("SELECT conversation_id, role FROM messages ORDER BY id")
    finally:
        await conn.close()
    assert streaming == 0
    roles: dict[str, list[str]] = {}
    for row in rows:
        roles.setdefault(str(row["conversation_id"]), []).append(row["role"])
    dropped_on_a = {o.conversation_id for o in outcomes if "post dropped" in o.notes}
    for conversation_id, sequence in roles.items():
        if sequence != ["user", "assistant"]:
            assert conversation_id in dropped_on_a, (conversation_id, sequence)
            assert sequence[-1] == "assistant" or sequence == ["user"], (conversation_id, sequence)
    assert len(roles) == REPLIES
    unanswered = sum(1 for o in outcomes if "unanswered" in o.notes)
    interrupted = sum(1 for s in stored_by_id.values() if s.status == "incomplete")
    resumed = sum(o.resumes for o in outcomes)
    print(
        f"\n{REPLIES} messages: {resumed} resumes, {interrupted} replies settled incomplete after the kill, "
        f"{unanswered} unanswered (A died before their first token), 0 lost; "
        f"{len(ahead)} clients of A had {ahead} characters more than A saved before it died"
    )
    assert interrupted >= 1  # the kill did hit replies mid-way
    assert resumed >= REPLIES // 4


async def _converse(
    outcome: Outcome,
    first: httpx.AsyncClient,
    on_a: httpx.AsyncClient,
    on_b: httpx.AsyncClient,
    content: str,
    cut_after: int,
    cut: bool,
    killed: asyncio.Event,
) -> None:
    """Send the message, maybe drop the connection after `cut_after` events, then resume through the
    other server (B whenever A is dead), until the final event."""
    last_id: str | None = None
    url = f"/v1/conversations/{outcome.conversation_id}/messages"
    client = first
    while outcome.message_id is None:
        outcome.through_a |= client is on_a
        try:
            async with client.stream("POST", url, json={"content": content}) as response:
                if response.status_code == 409 and killed.is_set():
                    # Sent again through B after A died: A may have taken the conversation's turn
                    # lease before its database write was cut off. The lease expires by itself
                    # (nobody renews it), and then B answers; until then B says the conversation
                    # is busy, which is right. Asking again is what a client does.
                    body = await response.aread()
                    assert b"conversation_busy" in body, body
                    outcome.notes.append("busy after the kill")
                    continue
                assert response.status_code == 200, await response.aread()
                count = 0
                async for event in iter_sse(response):
                    last_id = event.id
                    _take(outcome, event)
                    count += 1
                    if outcome.final is not None or (cut and count >= cut_after):
                        break
        except httpx.TransportError:
            outcome.notes.append("post dropped")
            # Only the kill drops a connection here; A may still be storing things until its
            # database connection is cut too: look once it is.
            async with asyncio.timeout(DEADLINE):
                await killed.wait()
        if outcome.message_id is None:
            # A died before its first event reached us: if the reply was created, follow it from the
            # start; if not (A died before the first token), the message is stored, unanswered.
            outcome.notes.append("no message event")
            outcome.message_id = await _settled_reply_id(on_b, outcome.conversation_id)
            if outcome.message_id is None:
                messages = (await on_b.get(url)).json()["data"]
                if messages:
                    assert [(m["role"], m["content"]) for m in messages] == [("user", content)], messages
                    outcome.notes.append("unanswered")
                    return
                client = on_b  # never arrived (A was already gone): send it again, through B
    while outcome.final is None:
        client = on_b if client is on_a or killed.is_set() else on_a
        outcome.resumes += 1
        outcome.through_a |= client is on_a
        headers = {"Last-Event-ID": last_id} if last_id is not None else {}
        try:
            async with client.stream("GET", f"{url}/{outcome.message_id}/stream", headers=headers) as response:
                assert response.status_code == 200, await response.aread()
                async for event in iter_sse(response):
                    last_id = event.id
                    _take(outcome, event)
        except httpx.TransportError:
            outcome.notes.append("resume dropped")


def _take(outcome: Outcome, event: Any) -> None:
    data = event.json()
    if event.event == "message":
        outcome.message_id = data["message_id"]
    elif event.event == "token":
        outcome.text += data["text"]
    else:
        outcome.final, outcome.final_kind = data, event.event


async def _settled_reply_id(client: httpx.AsyncClient, conversation_id: str) -> int | None:
    """The conversation's reply once nothing in it streams any more (the dead server's reply is
    settled by B's sweeper), or None if there is none."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while True:
        page = (await client.get(f"/v1/conversations/{conversation_id}/messages")).json()["data"]
        if all(m["status"] != "streaming" for m in page):
            replies = [m for m in page if m["role"] == "assistant"]
            return int(replies[0]["id"]) if replies else None
        assert loop.time() < deadline, f"a reply in {conversation_id} stays streaming"
        await asyncio.sleep(0.05)
