"""Reply runs over real HTTP (companion/chat/runs.py): event ids, resume after Last-Event-ID on the
same server and, with Redis, through another one; stop wherever the reply runs; replies whose
server died settled by a live one; the OpenAI-compatible route stopping when its client leaves."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from companion.config import Settings
from companion.llm.scripted import ScriptedProvider, ScriptedReply
from companion.services import Services
from companion.types import utcnow
from tests.conftest import make_settings, new_client
from tests.support.api import all_messages, assert_error, create_conversation
from tests.support.instances import Instance, running_instances
from tests.support.live import LiveServer, SSEEvent, iter_sse, wait_for
from tests.support.redis_proc import RedisProcess, running_redis

DEADLINE = 15.0
STORY = "Once upon a time 👋🏽 a naïve fox met a crow, and they talked until dawn."


class FakeClock:
    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> Any:
        return self.now


def tokens_text(events: list[SSEEvent]) -> str:
    return "".join(event.json()["text"] for event in events if event.event == "token")


async def open_reply(client: httpx.AsyncClient, conversation_id: str, content: str) -> httpx.Response:
    request = client.build_request("POST", f"/v1/conversations/{conversation_id}/messages", json={"content": content})
    async with asyncio.timeout(DEADLINE):
        response = await client.send(request, stream=True)
    assert response.status_code == 200
    return response


async def take(events: AsyncIterator[SSEEvent], count: int) -> list[SSEEvent]:
    async with asyncio.timeout(DEADLINE):
        return [await anext(events) for _ in range(count)]


async def resume(
    client: httpx.AsyncClient, conversation_id: str, message_id: int, last_event_id: str | None = None, **params: str
) -> list[SSEEvent]:
    headers = {"Last-Event-ID": last_event_id} if last_event_id is not None else {}
    url = f"/v1/conversations/{conversation_id}/messages/{message_id}/stream"
    async with asyncio.timeout(DEADLINE):
        async with client.stream("GET", url, headers=headers, params=params) as response:
            assert response.status_code == 200, await response.aread()
            assert response.headers["content-type"].startswith("text/event-stream")
            return [event async for event in iter_sse(response)]


async def reply_row(client: httpx.AsyncClient, conversation_id: str, message_id: int) -> dict[str, Any]:
    return next(m for m in await all_messages(client, conversation_id) if m["id"] == message_id)


async def settled_row(client: httpx.AsyncClient, conversation_id: str, message_id: int) -> dict[str, Any]:
    async def settled() -> bool:
        return (await reply_row(client, conversation_id, message_id))["status"] != "streaming"

    await wait_for(settled, timeout=DEADLINE, what=f"reply {message_id} to settle")
    return await reply_row(client, conversation_id, message_id)


# --- one server, no Redis ------------------------------------------------------------------------


async def test_every_event_has_an_id_and_the_first_names_the_reply(
    client: httpx.AsyncClient, provider: ScriptedProvider
):
    provider.queue(STORY)
    conversation_id = (await create_conversation(client))["id"]
    async with client.stream(
        "POST", f"/v1/conversations/{conversation_id}/messages", json={"content": "A story"}
    ) as response:
        events = [event async for event in iter_sse(response)]
    assert events[0].event == "message" and events[0].id == "0"
    message_id = events[0].json()["message_id"]
    offset = 0
    for event in events[1:-1]:
        assert event.event == "token"
        offset += len(event.json()["text"])
        assert event.id == str(offset)  # the reply's length in characters so far
    assert events[-1].event == "done" and events[-1].id == "end"
    assert events[-1].json()["message_id"] == message_id
    stored = await reply_row(client, conversation_id, message_id)
    assert (stored["content"], stored["status"]) == (STORY, "complete")
    assert offset == len(STORY)


async def test_a_reply_resumes_after_the_last_event_id_on_the_same_server(
    client: httpx.AsyncClient, provider: ScriptedProvider
):
    gate = asyncio.Semaphore(4)
    provider.queue(ScriptedReply(STORY, gate=gate))
    conversation_id = (await create_conversation(client))["id"]

    response = await open_reply(client, conversation_id, "Tell me a story")
    try:
        before = await take(iter_sse(response), 5)  # message + 4 tokens; then the connection drops
    finally:
        await response.aclose()
    message_id = before[0].json()["message_id"]

    # The reply goes on without its client ...
    gate.release()
    await wait_for(lambda: gate._value == 0, timeout=DEADLINE, what="the model to take the next token")

    # ... and a resume sends what was missed and follows the rest live, to the same `done`.
    resumed = asyncio.create_task(resume(client, conversation_id, message_id, before[-1].id))
    for _ in range(200):
        gate.release()
    after = await resumed
    assert [e.event for e in after if e.event != "token"] == ["done"]
    assert tokens_text(before) + tokens_text(after) == STORY
    assert after[-1].json()["content"] == STORY
    stored = await settled_row(client, conversation_id, message_id)
    assert (stored["content"], stored["status"]) == (STORY, "complete")


async def test_an_ended_reply_replays_at_once_from_any_point(client: httpx.AsyncClient, provider: ScriptedProvider):
    provider.queue(STORY)
    conversation_id = (await create_conversation(client))["id"]
    async with client.stream("POST", f"/v1/conversations/{conversation_id}/messages", json={"content": "Hi"}) as r:
        original = [event async for event in iter_sse(r)]
    message_id = original[0].json()["message_id"]

    whole = await resume(client, conversation_id, message_id)
    assert whole[0].event == "message" and whole[-1].event == "done"
    assert tokens_text(whole) == STORY
    assert whole[0].json()["message_id"] == message_id

    for cut in (original[1], original[3], original[-2]):
        rest = await resume(client, conversation_id, message_id, after=cut.id)  # ?after= works as the header
        assert STORY[: int(cut.id)] + tokens_text(rest) == STORY
    assert await resume(client, conversation_id, message_id, "end") == []


async def test_resume_of_an_unknown_or_foreign_reply_is_404_and_a_bad_id_422(
    server: LiveServer, client: httpx.AsyncClient, provider: ScriptedProvider
):
    provider.queue("Mine.")
    conversation_id = (await create_conversation(client))["id"]
    async with client.stream("POST", f"/v1/conversations/{conversation_id}/messages", json={"content": "Hi"}) as r:
        events = [event async for event in iter_sse(r)]
    message_id = events[0].json()["message_id"]
    user_message_id = events[0].json()["user_message_id"]
    base = f"/v1/conversations/{conversation_id}/messages"

    async with await new_client(server, "mallory") as mallory:
        assert_error(await mallory.get(f"{base}/{message_id}/stream"), 404)
        assert_error(await mallory.post(f"{base}/{message_id}/stop"), 404)
    assert_error(await client.get(f"{base}/{user_message_id}/stream"), 404)  # not a reply
    assert_error(await client.get(f"{base}/999999/stream"), 404)
    for bad in ("abc", "-1", "1.5", "0x10"):
        assert_error(await client.get(f"{base}/{message_id}/stream", params={"after": bad}), 422, "invalid_event_id")
    assert_error(await client.get(f"{base}/{message_id}/stream", headers={"Last-Event-ID": "x"}), 422)


async def test_stop_ends_a_stalled_reply_and_keeps_its_text(client: httpx.AsyncClient, provider: ScriptedProvider):
    provider.queue(ScriptedReply(STORY, hang_after=3))  # a model that stops producing: only stop ends it
    conversation_id = (await create_conversation(client))["id"]
    response = await open_reply(client, conversation_id, "Tell me a story")
    try:
        events = iter_sse(response)
        before = await take(events, 4)
        message_id = before[0].json()["message_id"]
        started = time.monotonic()
        stopped = await client.post(f"/v1/conversations/{conversation_id}/messages/{message_id}/stop")
        elapsed = time.monotonic() - started
        assert stopped.status_code == 200, stopped.text
        assert (stopped.json()["status"], stopped.json()["content"]) == ("stopped", "Once upon a ")
        async with asyncio.timeout(DEADLINE):
            rest = [event async for event in events]
    finally:
        await response.aclose()
    assert [e.event for e in rest] == ["done"]
    assert rest[0].json()["finish_reason"] == "stopped" and rest[0].json()["content"] == "Once upon a "
    print(f"stop on the same server: {elapsed * 1000:.0f} ms")

    # Stopping it again is harmless, a resume ends at once with the same final state, and the
    # conversation is free for the next message.
    again = await client.post(f"/v1/conversations/{conversation_id}/messages/{message_id}/stop")
    assert again.json()["status"] == "stopped"
    replay = await resume(client, conversation_id, message_id, "0")
    assert tokens_text(replay) == "Once upon a " and replay[-1].json()["finish_reason"] == "stopped"
    provider.queue("Yes?")
    async with client.stream("POST", f"/v1/conversations/{conversation_id}/messages", json={"content": "Hm"}) as r:
        assert [event async for event in iter_sse(r)][-1].event == "done"


# --- replies whose server died ---------------------------------------------------------------------


async def test_a_reply_whose_server_died_is_settled_and_its_resume_ends(settings: Settings, provider: ScriptedProvider):
    clock = FakeClock()
    services = Services.build(settings, provider=provider, clock=clock)
    await services.start()
    try:
        user = await services.users.create("alice")
        conversation = await services.conversations.create(user.id, "elara")
        await services.conversations.add_message(conversation.id, "user", "Hello?")
        # A reply another server was generating when it died: its last heartbeat is its creation.
        dead = await services.conversations.add_message(conversation.id, "assistant", "Half a rep", status="streaming")
        alive = await services.conversations.add_message(conversation.id, "assistant", "Going", status="streaming")
        follower = asyncio.create_task(
            _collect(services.runs.follow(await services.runs.resume(user.id, conversation.id, dead.id), 4))
        )

        clock.now += timedelta(seconds=settings.reply_stale_seconds - 1)
        await services.conversations.heartbeat(alive.id)  # this one's server is alive
        assert await services.runs.sweep() == 0  # not stale yet
        clock.now += timedelta(seconds=2)
        assert await services.runs.sweep() == 1

        rows = {m.id: m for m in (await services.conversations.list_messages(user.id, conversation.id))[0]}
        assert (rows[dead.id].content, rows[dead.id].status) == ("Half a rep", "incomplete")
        assert rows[alive.id].status == "streaming"
        async with asyncio.timeout(DEADLINE):
            events = await follower
        assert [(e.kind, e.text) for e in events] == [("token", " a rep"), ("error", "")]
        assert events[-1].payload()["error"]["code"] == "reply_interrupted"

        # Its own running replies are never swept, however long the model stalls.
        assert services.runs.stale_seconds == settings.reply_stale_seconds
    finally:
        await services.aclose()


async def _collect(events: AsyncIterator[Any]) -> list[Any]:
    return [event async for event in events]


async def test_a_live_reply_keeps_beating_while_its_model_stalls(database_url: str, tmp_path: Path):
    settings = make_settings(database_url, tmp_path, reply_heartbeat_seconds=0.05, reply_stale_seconds=1.0)
    provider = ScriptedProvider([ScriptedReply("Thinking hard about it", hang_after=2)])
    services = Services.build(settings, provider=provider)
    await services.start()
    try:
        user = await services.users.create("alice")
        conversation = await services.conversations.create(user.id, "elara")
        turn = await services.chat.begin(user.id, conversation, "Think")
        run = await services.runs.start(turn)
        assert run.message_id is not None
        first = await services.conversations.message(run.message_id)
        assert first is not None

        async def beaten_past_the_threshold() -> bool:
            return bool(await _heartbeat_after(services, run.message_id, first.created_at, minimum=1.2))

        await wait_for(beaten_past_the_threshold, timeout=DEADLINE, what="the stalled run to beat")
        # Another server sweeping with the same threshold leaves it alone: it is older than the
        # threshold, but alive (a 1 s threshold over 50 ms beats: a loaded machine's late beat is
        # not silence).
        other = Services.build(settings, provider=ScriptedProvider())
        try:
            assert await other.runs.sweep() == 0
        finally:
            await other.database.dispose()
        row = await services.conversations.message(run.message_id)
        assert row is not None and row.status == "streaming"
    finally:
        await services.aclose()
    row = await _row(settings, run.message_id)
    assert row["status"] == "incomplete"  # a clean shutdown settles what it was running


async def _heartbeat_after(services: Services, message_id: int, since: Any, *, minimum: float) -> bool:
    from sqlalchemy import select

    from companion.storage.models import Message

    async with services.database.session() as session:
        beat = await session.scalar(select(Message.heartbeat_at).where(Message.id == message_id))
    return beat is not None and (beat - since).total_seconds() >= minimum


async def _row(settings: Settings, message_id: int) -> dict[str, Any]:
    services = Services.build(settings, provider=ScriptedProvider())
    try:
        row = await services.conversations.message(message_id)
        assert row is not None
        return row.model_dump()
    finally:
        await services.database.dispose()


# --- the OpenAI-compatible route -----------------------------------------------------------------


async def test_openai_streaming_client_that_leaves_stops_the_reply(
    client: httpx.AsyncClient, provider: ScriptedProvider, app_services: Services
):
    gate = asyncio.Semaphore(2)
    provider.queue(ScriptedReply("one two three four five six", gate=gate))
    request = client.build_request(
        "POST",
        "/v1/chat/completions",
        json={"model": "elara", "stream": True, "messages": [{"role": "user", "content": "Count"}]},
    )
    response = await client.send(request, stream=True)
    try:
        lines = response.aiter_lines()
        seen = 0
        async with asyncio.timeout(DEADLINE):
            async for line in lines:
                if '"content":"t' in line or '"content":"o' in line:
                    seen += 1
                if seen == 2:
                    break
    finally:
        await response.aclose()
    conversation_id = response.headers["x-conversation-id"]

    async def settled() -> bool:
        messages = await all_messages(client, conversation_id)
        return len(messages) == 2 and messages[1]["status"] != "streaming"

    await wait_for(settled, timeout=DEADLINE, what="the reply to stop")
    for _ in range(10):
        gate.release()
    messages = await all_messages(client, conversation_id)
    assert (messages[1]["content"], messages[1]["status"]) == ("one two ", "incomplete")
    assert not app_services.runs.running(messages[1]["id"])


# --- two servers sharing PostgreSQL/SQLite and Redis ---------------------------------------------


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisProcess]:
    async with running_redis(tmp_path / "redis") as server:
        yield server


@pytest.fixture
async def two(database_url: str, tmp_path: Path, redis_server: RedisProcess) -> AsyncIterator[list[Instance]]:
    settings = make_settings(database_url, tmp_path, redis_enabled=True, redis_url=redis_server.url)
    async with running_instances(settings, 2) as instances:
        yield instances


async def test_a_reply_started_on_one_server_resumes_and_stops_through_the_other(two: list[Instance]):
    a, b = two
    key = (await a.services.users.create("alice")).api_key
    gate = asyncio.Semaphore(3)
    a.provider.queue(ScriptedReply(STORY, gate=gate), ScriptedReply("Long " * 200, hang_after=5))
    async with a.client(key) as on_a, b.client(key) as on_b:
        conversation_id = (await create_conversation(on_a))["id"]
        response = await open_reply(on_a, conversation_id, "Tell me a story")
        try:
            before = await take(iter_sse(response), 4)
        finally:
            await response.aclose()
        message_id = before[0].json()["message_id"]

        resumed = asyncio.create_task(resume(on_b, conversation_id, message_id, before[-1].id))
        for _ in range(200):
            gate.release()
        after = await resumed
        assert tokens_text(before) + tokens_text(after) == STORY
        assert after[-1].event == "done" and after[-1].json()["content"] == STORY
        assert (await settled_row(on_b, conversation_id, message_id))["content"] == STORY

        # A stop through B ends a reply running on A.
        response = await open_reply(on_a, conversation_id, "Go on")
        try:
            events = iter_sse(response)
            first = await take(events, 6)
            second_id = first[0].json()["message_id"]
            started = time.monotonic()
            stopped = await on_b.post(f"/v1/conversations/{conversation_id}/messages/{second_id}/stop")
            elapsed = time.monotonic() - started
            assert stopped.status_code == 200, stopped.text
            assert stopped.json()["status"] == "stopped"
            assert stopped.json()["content"] == "Long " * 5
            async with asyncio.timeout(DEADLINE):
                rest = [event async for event in events]
        finally:
            await response.aclose()
        assert rest[-1].json()["finish_reason"] == "stopped"
        print(f"stop through the other server: {elapsed * 1000:.0f} ms")
        replay = await resume(on_b, conversation_id, second_id, "0")
        assert tokens_text(replay) == "Long " * 5 and replay[-1].json()["finish_reason"] == "stopped"


async def test_a_reply_that_ends_within_the_first_flush_interval_writes_no_stream_and_resumes_elsewhere(
    two: list[Instance], redis_server: RedisProcess
):
    """The Redis Stream is begun one flush interval after a reply starts: a reply that has ended by
    then costs Redis nothing, and another server resumes it from the database row, whole. A reply
    still running at that point has its stream, and the other server reads it."""
    import redis.asyncio as redis

    from companion.cache import keys

    a, b = two
    key = (await a.services.users.create("quick")).api_key
    gate = asyncio.Semaphore(2)
    a.provider.queue(ScriptedReply(STORY), ScriptedReply(STORY, gate=gate))
    watcher = redis.from_url(redis_server.url)
    try:
        async with a.client(key) as on_a, b.client(key) as on_b:
            conversation_id = (await create_conversation(on_a))["id"]
            response = await open_reply(on_a, conversation_id, "Quick one")
            try:
                async with asyncio.timeout(DEADLINE):
                    events = [event async for event in iter_sse(response)]
            finally:
                await response.aclose()
            message_id = events[0].json()["message_id"]
            assert events[-1].event == "done"
            # Once A's run and its stream writer are done, nothing was written.
            async def runs_done() -> bool:
                return not a.services.runs._tasks

            await wait_for(runs_done, timeout=DEADLINE, what="A's reply run and stream writer to end")
            assert not await watcher.exists(keys.reply_events(message_id))
            for cut in ("0", events[3].id):
                replay = await resume(on_b, conversation_id, message_id, cut)
                before = tokens_text(events[:4]) if cut != "0" else ""
                assert before + tokens_text(replay) == STORY
                assert replay[-1].event == "done" and replay[-1].json()["content"] == STORY

            # A reply still running after the interval writes its stream, and B follows it.
            response = await open_reply(on_a, conversation_id, "Slow one")
            try:
                first = await take(iter_sse(response), 3)
                slow_id = first[0].json()["message_id"]

                async def stream_begun() -> bool:
                    return bool(await watcher.exists(keys.reply_events(slow_id)))

                await wait_for(stream_begun, timeout=DEADLINE, what="the slow reply's stream")
                resumed = asyncio.create_task(resume(on_b, conversation_id, slow_id, first[-1].id))
                for _ in range(200):
                    gate.release()
                after = await resumed
            finally:
                await response.aclose()
            assert tokens_text(first) + tokens_text(after) == STORY
            assert after[-1].event == "done"
    finally:
        await watcher.aclose()


async def test_following_a_reply_does_not_hold_a_request_slot(database_url: str, tmp_path: Path):
    """Admission control lets one request at a time here: a resume that follows a long reply must
    not keep it, or every other request would be refused while someone waits for text."""
    settings = make_settings(database_url, tmp_path, admission_max_requests=1, admission_request_queue=0)
    provider = ScriptedProvider([ScriptedReply(STORY, hang_after=3)])
    from tests.support.api import running_server

    async with running_server(settings, provider) as live, await new_client(live, "alice") as client:
        conversation_id = (await create_conversation(client))["id"]
        response = await open_reply(client, conversation_id, "Tell me a story")
        try:
            message_id = (await take(iter_sse(response), 1))[0].json()["message_id"]
            url = f"/v1/conversations/{conversation_id}/messages/{message_id}/stream"
            async with client.stream("GET", url, headers={"Last-Event-ID": "0"}) as following:
                assert following.status_code == 200
                assert (await take(iter_sse(following), 1))[0].event == "token"
                # While it follows, other requests get the one request slot.
                for _ in range(3):
                    assert (await client.get("/v1/conversations")).status_code == 200
            stopped = await client.post(f"/v1/conversations/{conversation_id}/messages/{message_id}/stop")
            assert stopped.json()["status"] == "stopped"
        finally:
            await response.aclose()


async def test_a_resume_of_a_dead_servers_reply_gets_the_text_saved_after_its_last_batch(
    database_url: str, tmp_path: Path, redis_server: RedisProcess
):
    """The dead server saved more text to the database than it had written to the reply's Redis
    Stream (the two are flushed on their own schedules): the resume sends that text before the end."""
    from companion.runs.events import RunEvent

    settings = make_settings(database_url, tmp_path, redis_enabled=True, redis_url=redis_server.url)
    clock = FakeClock()
    services = Services.build(settings, provider=ScriptedProvider(), clock=clock)
    await services.start()
    try:
        assert services.runs.shared is not None
        user = await services.users.create("alice")
        conversation = await services.conversations.create(user.id, "elara")
        await services.conversations.add_message(conversation.id, "user", "Hello?")
        reply = await services.conversations.add_message(
            conversation.id, "assistant", "One two three", status="streaming"
        )
        await services.runs.shared.write(
            reply.id,
            [
                RunEvent("message", 0, data={"message_id": reply.id}),
                RunEvent("token", 0, "One "),
                RunEvent("token", 4, "two "),
            ],
        )
        message = await services.runs.resume(user.id, conversation.id, reply.id)
        follower = asyncio.create_task(_collect(services.runs.follow(message, 4)))
        clock.now += timedelta(seconds=settings.reply_stale_seconds + 1)
        assert await services.runs.sweep() == 1
        async with asyncio.timeout(DEADLINE):
            events = await follower
        assert [(e.kind, e.text) for e in events] == [("token", "two "), ("token", "three"), ("error", "")]
        assert "One " + "".join(e.text for e in events) == "One two three"
        assert events[-1].payload()["content"] == "One two three"
    finally:
        await services.aclose()


async def test_a_resume_from_the_start_of_a_reply_whose_stream_holds_only_its_end(
    database_url: str, tmp_path: Path, redis_server: RedisProcess
):
    """A server that died before writing any event of a reply to Redis: the sweeper's end is all
    its stream holds. A client that has nothing (no Last-Event-ID) still gets the whole saved text."""
    settings = make_settings(database_url, tmp_path, redis_enabled=True, redis_url=redis_server.url)
    clock = FakeClock()
    services = Services.build(settings, provider=ScriptedProvider(), clock=clock)
    await services.start()
    try:
        user = await services.users.create("alice")
        conversation = await services.conversations.create(user.id, "elara")
        await services.conversations.add_message(conversation.id, "user", "Hello?")
        reply = await services.conversations.add_message(conversation.id, "assistant", "Saved text", status="streaming")
        clock.now += timedelta(seconds=settings.reply_stale_seconds + 1)
        assert await services.runs.sweep() == 1
        message = await services.runs.resume(user.id, conversation.id, reply.id)
        async with asyncio.timeout(DEADLINE):
            events = await _collect(services.runs.follow(message, -1))
        assert "".join(e.text for e in events if e.kind == "token") == "Saved text"
        assert events[-1].kind == "error" and events[-1].payload()["error"]["code"] == "reply_interrupted"
    finally:
        await services.aclose()
