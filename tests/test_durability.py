"""Durability of a chat turn over real HTTP (DESIGN-NOTES #6, `companion.chat.service`): the user's
message is stored before generation, tokens stream as they are generated and are saved while they
stream, and every way a turn can end (done, client gone, provider failure, crash) leaves a stored
state that says what happened. The scripted provider paces, fails and hangs deterministically."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from companion.config import Settings
from companion.llm.scripted import ScriptedProvider, ScriptedReply
from companion.services import Services
from companion.types import utcnow
from tests.conftest import make_settings
from tests.support.api import all_messages, assert_error, create_conversation, running_server, user_client
from tests.support.live import LiveServer, SSEEvent, iter_sse, wait_for

DEADLINE = 10.0  # seconds; generous, only there so that a regression fails instead of hanging


# --- helpers -------------------------------------------------------------------------------------


def open_stream(client: httpx.AsyncClient, conversation_id: str, content: str) -> asyncio.Task[httpx.Response]:
    """Send a streamed turn in the background; the task resolves when the response headers arrive
    (the caller closes the response)."""
    request = client.build_request("POST", f"/v1/conversations/{conversation_id}/messages", json={"content": content})
    return asyncio.create_task(client.send(request, stream=True))


async def response_of(task: asyncio.Task[httpx.Response]) -> httpx.Response:
    async with asyncio.timeout(DEADLINE):
        return await task


async def next_event(events: AsyncIterator[SSEEvent]) -> SSEEvent:
    async with asyncio.timeout(DEADLINE):
        return await anext(events)


async def rest_of(events: AsyncIterator[SSEEvent]) -> list[SSEEvent]:
    async with asyncio.timeout(DEADLINE):
        return [event async for event in events]


async def chat_stream(client: httpx.AsyncClient, conversation_id: str, content: str) -> list[SSEEvent]:
    async with asyncio.timeout(DEADLINE):
        async with client.stream(
            "POST", f"/v1/conversations/{conversation_id}/messages", json={"content": content}
        ) as response:
            assert response.status_code == 200, await response.aread()
            return [event async for event in iter_sse(response)]


def assert_error_event(event: SSEEvent, code: str, message_id: int | None) -> dict[str, Any]:
    assert event.event == "error", event
    body = event.json()
    assert set(body) == {"error", "message_id"}, body
    assert set(body["error"]) == {"message", "type", "code", "param"}, body
    assert body["error"]["code"] == code, body
    assert body["error"]["message"], body
    assert body["message_id"] == message_id, body
    return body


def tokens_of(events: list[SSEEvent]) -> list[str]:
    return [event.json()["text"] for event in events if event.event == "token"]


def release(gate: asyncio.Semaphore, tokens: int) -> None:
    for _ in range(tokens):
        gate.release()


class FakeClock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


# --- the user's message comes first --------------------------------------------------------------


async def test_user_message_is_stored_before_generation_starts(
    server: LiveServer, client: httpx.AsyncClient, api_key: str, provider: ScriptedProvider
):
    gate = asyncio.Semaphore(0)
    provider.queue(ScriptedReply("One two three", gate=gate))
    conversation_id = (await create_conversation(client))["id"]

    task = open_stream(client, conversation_id, "Are you there?")
    try:
        # The model has been called and waits for its first token ...
        await wait_for(lambda: len(provider.prompts) == 1, timeout=DEADLINE, what="generation to start")
        # ... and the user's message is already stored, seen by another connection.
        async with httpx.AsyncClient(
            base_url=server.base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=DEADLINE
        ) as other:
            stored = await all_messages(other, conversation_id)
        assert [(m["role"], m["content"], m["status"]) for m in stored] == [("user", "Are you there?", "complete")]

        gate.release()
        response = await response_of(task)
        assert response.status_code == 200
        events = iter_sse(response)
        first = await next_event(events)
        assert first.event == "message"
        assert first.json() == {
            "message_id": stored[0]["id"] + 1,  # the reply's row, created with the first token
            "user_message_id": stored[0]["id"],
            "conversation_id": conversation_id,
        }
        assert (await next_event(events)).json() == {"text": "One "}
        release(gate, 2)
        rest = await rest_of(events)
        assert tokens_of(rest) == ["two ", "three"]
        assert rest[-1].event == "done" and rest[-1].json()["content"] == "One two three"
    finally:
        release(gate, 10)
        await (await response_of(task)).aclose()


async def test_tokens_are_sent_as_they_are_generated(client: httpx.AsyncClient, provider: ScriptedProvider):
    gate = asyncio.Semaphore(0)
    words = ["Tokens ", "arrive ", "one ", "at ", "a ", "time."]
    provider.queue(ScriptedReply("".join(words), gate=gate))
    conversation_id = (await create_conversation(client))["id"]

    task = open_stream(client, conversation_id, "Stream to me")
    gate.release()
    response = await response_of(task)
    try:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = iter_sse(response)
        assert (await next_event(events)).event == "message"
        for index, word in enumerate(words):
            if index:
                gate.release()  # the model may produce the next token only now
            event = await next_event(events)  # arrives although the model is stalled: not buffered
            assert (event.event, event.json()) == ("token", {"text": word})
        done = await next_event(events)
        assert done.event == "done" and done.json()["content"] == "".join(words)
        assert await rest_of(events) == []
    finally:
        await response.aclose()


# --- the reply is saved while it streams ---------------------------------------------------------


@pytest.fixture
def fast_flush_settings(database_url: str, tmp_path: Path) -> Settings:
    return make_settings(database_url, tmp_path, stream_flush_interval_seconds=0.01)


@pytest.fixture
async def fast_flush_server(fast_flush_settings: Settings, provider: ScriptedProvider) -> AsyncIterator[LiveServer]:
    async with running_server(fast_flush_settings, provider) as live:
        yield live


async def test_reply_is_saved_while_it_streams(fast_flush_server: LiveServer, provider: ScriptedProvider):
    gate = asyncio.Semaphore(0)
    provider.queue(ScriptedReply("w1 w2 w3 w4 w5", gate=gate))
    async with user_client(fast_flush_server, "alice") as client:
        conversation_id = (await create_conversation(client))["id"]

        async def assistant() -> dict[str, Any] | None:
            messages = await all_messages(client, conversation_id)
            return next((m for m in messages if m["role"] == "assistant"), None)

        async def assistant_holds(content: str) -> bool:
            message = await assistant()
            return message is not None and (message["content"], message["status"]) == (content, "streaming")

        task = open_stream(client, conversation_id, "Tell me something")
        gate.release()
        response = await response_of(task)
        try:
            events = iter_sse(response)
            assert (await next_event(events)).event == "message"
            assert (await next_event(events)).json() == {"text": "w1 "}
            # The reply row exists from the first token on, marked as still streaming.
            await wait_for(lambda: assistant_holds("w1 "), timeout=DEADLINE, what="the first token to be saved")

            # A burst of tokens, then the model stalls: what the user saw is saved anyway, within the
            # flush interval, not only when the next token happens to arrive.
            release(gate, 2)
            assert tokens_of([await next_event(events), await next_event(events)]) == ["w2 ", "w3 "]
            await wait_for(lambda: assistant_holds("w1 w2 w3 "), timeout=DEADLINE, what="the burst to be saved")

            release(gate, 2)
            rest = await rest_of(events)
            assert tokens_of(rest) == ["w4 ", "w5"]
            assert rest[-1].event == "done"
        finally:
            await response.aclose()
        message = await assistant()
        assert message is not None
        assert (message["content"], message["status"]) == ("w1 w2 w3 w4 w5", "complete")
        assert message["id"] == rest[-1].json()["message_id"]


# --- every way a turn can end --------------------------------------------------------------------


async def test_client_disconnect_does_not_stop_the_reply(client: httpx.AsyncClient, provider: ScriptedProvider):
    """The reply runs apart from the request: the client leaving mid-reply changes nothing, the
    reply is generated to its end and stored `complete`."""
    gate = asyncio.Semaphore(3)
    provider.queue(ScriptedReply("Once upon a time there was a fox", gate=gate))
    conversation_id = (await create_conversation(client))["id"]

    response = await response_of(open_stream(client, conversation_id, "Tell me a story"))
    try:
        assert response.status_code == 200
        events = iter_sse(response)
        assert (await next_event(events)).event == "message"
        seen = tokens_of([await next_event(events) for _ in range(3)])
        assert seen == ["Once ", "upon ", "a "]
    finally:
        await response.aclose()  # the body is unread: httpx drops the connection

    release(gate, 10)  # the model goes on only now, after the client has gone

    async def settled() -> bool:
        messages = await all_messages(client, conversation_id)
        return len(messages) == 2 and messages[1]["status"] != "streaming"

    await wait_for(settled, timeout=DEADLINE, what="the reply to be settled")
    messages = await all_messages(client, conversation_id)
    assert [(m["role"], m["content"], m["status"]) for m in messages] == [
        ("user", "Tell me a story", "complete"),
        ("assistant", "Once upon a time there was a fox", "complete"),
    ]

    # The conversation goes on, and the model sees the whole reply.
    provider.queue("Sorry, where was I?")
    after = await chat_stream(client, conversation_id, "Go on")
    assert after[-1].event == "done" and after[-1].json()["content"] == "Sorry, where was I?"
    prompt = [(m.role, m.content) for m in provider.prompts[-1]]
    assert prompt[1:] == [
        ("user", "Tell me a story"),
        ("assistant", "Once upon a time there was a fox"),
        ("user", "Go on"),
    ]


@pytest.mark.parametrize(
    ("reply", "code"),
    [
        (ScriptedReply("Half of this reply is lost", fail_after=2), "llm_provider_error"),
        (ScriptedReply("Half of this reply is lost", timeout_after=2), "llm_provider_timeout"),
    ],
    ids=["error", "timeout"],
)
async def test_provider_failure_mid_reply_ends_the_stream_with_an_error_event(
    client: httpx.AsyncClient, provider: ScriptedProvider, reply: ScriptedReply, code: str
):
    provider.queue(reply)
    conversation_id = (await create_conversation(client))["id"]

    events = await chat_stream(client, conversation_id, "Say something long")
    assert [e.event for e in events] == ["message", "token", "token", "error"]
    assert tokens_of(events) == ["Half ", "of "]
    messages = await all_messages(client, conversation_id)
    assert [(m["role"], m["content"], m["status"]) for m in messages] == [
        ("user", "Say something long", "complete"),
        ("assistant", "Half of ", "error"),
    ]
    assert events[0].json()["user_message_id"] == messages[0]["id"]
    assert_error_event(events[-1], code, messages[1]["id"])

    # The next turn works, and the partial reply is part of the conversation.
    provider.queue("Recovered.")
    assert (await chat_stream(client, conversation_id, "Again"))[-1].event == "done"
    assert ("assistant", "Half of ") in [(m.role, m.content) for m in provider.prompts[-1]]


@pytest.mark.parametrize(
    ("reply", "status", "code"),
    [
        (ScriptedReply("never sent", fail_after=0), 502, "llm_provider_error"),
        (ScriptedReply("never sent", timeout_after=0), 504, "llm_provider_timeout"),
    ],
    ids=["error", "timeout"],
)
async def test_provider_failure_before_the_first_token_answers_json(
    client: httpx.AsyncClient, provider: ScriptedProvider, reply: ScriptedReply, status: int, code: str
):
    conversation_id = (await create_conversation(client))["id"]

    for stream in (True, False):
        provider.queue(ScriptedReply(reply.text, fail_after=reply.fail_after, timeout_after=reply.timeout_after))
        response = await client.post(
            f"/v1/conversations/{conversation_id}/messages", json={"content": f"stream={stream}", "stream": stream}
        )
        assert_error(response, status, code)
        assert "retry-after" not in response.headers

    # The user's messages are kept; no empty or failed reply is invented.
    messages = await all_messages(client, conversation_id)
    assert [(m["role"], m["content"], m["status"]) for m in messages] == [
        ("user", "stream=True", "complete"),
        ("user", "stream=False", "complete"),
    ]


async def test_non_streamed_turn_returns_the_done_payload(client: httpx.AsyncClient, provider: ScriptedProvider):
    provider.queue("A whole reply at once.", ScriptedReply("Broken halfway through", fail_after=2))
    conversation_id = (await create_conversation(client))["id"]
    url = f"/v1/conversations/{conversation_id}/messages"

    response = await client.post(url, json={"content": "No streaming, please", "stream": False})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    done = response.json()
    assert set(done) == {"message_id", "user_message_id", "content", "finish_reason", "usage"}
    assert done["content"] == "A whole reply at once." and done["finish_reason"] == "stop"
    assert done["usage"]["completion_tokens"] == 5
    assert done["usage"]["total_tokens"] == done["usage"]["prompt_tokens"] + 5

    # A failure mid-reply in JSON mode is an error response; the partial reply is still stored.
    failed = await client.post(url, json={"content": "Once more", "stream": False})
    assert_error(failed, 502, "llm_provider_error")

    messages = await all_messages(client, conversation_id)
    assert [(m["id"], m["role"], m["content"], m["status"]) for m in messages] == [
        (done["user_message_id"], "user", "No streaming, please", "complete"),
        (done["message_id"], "assistant", "A whole reply at once.", "complete"),
        (messages[2]["id"], "user", "Once more", "complete"),
        (messages[3]["id"], "assistant", "Broken halfway ", "error"),
    ]


# --- a crash mid-reply ---------------------------------------------------------------------------


async def test_replies_left_streaming_by_a_crash_are_recovered_at_start(settings: Settings, provider: ScriptedProvider):
    clock = FakeClock(utcnow() - timedelta(minutes=30))
    services = Services.build(settings, provider=provider, clock=clock)
    await services.start()
    try:
        user = await services.users.create("alice")
        personality = await services.personalities.resolve(user.id, "elara")
        conversation = await services.conversations.create(user.id, personality.name)
        await services.conversations.add_message(conversation.id, "user", "First question")
        # A reply that was streaming when the process died, long ago ...
        await services.conversations.add_message(conversation.id, "assistant", "Old partial", status="streaming")
        clock.now += timedelta(minutes=11)
        # ... and one that another instance is streaming right now.
        await services.conversations.add_message(conversation.id, "user", "Second question")
        await services.conversations.add_message(conversation.id, "assistant", "Live partial", status="streaming")
    finally:
        await services.aclose()

    async with running_server(settings, provider, clock=clock) as live:
        async with httpx.AsyncClient(
            base_url=live.base_url, headers={"Authorization": f"Bearer {user.api_key}"}, timeout=DEADLINE
        ) as client:
            messages = await all_messages(client, str(conversation.id))
            assert [(m["content"], m["status"]) for m in messages] == [
                ("First question", "complete"),
                ("Old partial", "incomplete"),
                ("Second question", "complete"),
                ("Live partial", "streaming"),
            ]

            # The recovered partial reply is history; the live one is not (yet).
            provider.queue("Noted.")
            events = await chat_stream(client, str(conversation.id), "Third question")
            assert events[-1].event == "done"
            assert [(m.role, m.content) for m in provider.prompts[-1]][1:] == [
                ("user", "First question"),
                ("assistant", "Old partial"),
                ("user", "Second question"),
                ("user", "Third question"),
            ]


# --- concurrent turns ----------------------------------------------------------------------------


async def test_concurrent_turns_all_succeed_and_are_stored_once(client: httpx.AsyncClient, provider: ScriptedProvider):
    """Ten turns on ten conversations of one user all in flight at once (on SQLite: one writer at a
    time, WAL and BEGIN IMMEDIATE must make them wait, not fail), plus a second message to one of
    them, which waits for that conversation's reply to finish and then sees it in its prompt."""
    conversations = [(await create_conversation(client))["id"] for _ in range(10)]
    shared = conversations[0]
    turns = [(conversation_id, f"Hello from turn {index}") for index, conversation_id in enumerate(conversations)]
    gate = asyncio.Semaphore(0)
    replies = [f"Reply {index} for you" for index in range(len(turns) + 1)]  # four tokens each
    provider.queue(*(ScriptedReply(text, gate=gate) for text in replies))

    tasks = [asyncio.create_task(chat_stream(client, cid, content)) for cid, content in turns]
    try:
        # Every turn has stored its message and is generating: they really overlap.
        await wait_for(lambda: len(provider.prompts) == len(turns), timeout=DEADLINE, what="every turn to start")
        follow_up = asyncio.create_task(chat_stream(client, shared, "A second message in the same conversation"))
        tasks.append(follow_up)
        release(gate, 4 * (len(turns) + 1))
        async with asyncio.timeout(DEADLINE):
            results = await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()

    for events in results:
        assert [e.event for e in events] == ["message", "token", "token", "token", "token", "done"], events
    assert sorted(events[-1].json()["content"] for events in results) == sorted(replies)
    first_shared_reply = results[0][-1].json()["content"]
    follow_up_prompt = provider.prompts[-1]
    assert [(m.role, m.content) for m in follow_up_prompt[1:]] == [
        ("user", "Hello from turn 0"),
        ("assistant", first_shared_reply),
        ("user", "A second message in the same conversation"),
    ]

    stored: list[tuple[str, str, str]] = []
    for conversation_id in conversations:
        messages = await all_messages(client, conversation_id)
        assert len(messages) == (4 if conversation_id == shared else 2)
        stored += [(m["role"], m["content"], m["status"]) for m in messages]
    expected = [("user", content, "complete") for _, content in turns]
    expected += [("user", "A second message in the same conversation", "complete")]
    expected += [("assistant", reply, "complete") for reply in replies]
    assert sorted(stored) == sorted(expected)
