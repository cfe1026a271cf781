"""Regenerate, edit and switch branches through the routes, on SQLite and PostgreSQL: a regenerated
reply streams like a turn and the earlier ones stay as alternatives; an edit starts a branch; the
active path is what GET messages returns and what prompts, the buffer and the summary follow
(with Redis on and off, on two instances)."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from companion.llm.base import ChatMessage
from companion.llm.context import split_context
from companion.llm.scripted import ScriptedProvider, ScriptedReply
from companion.storage.models import ConversationSummary
from tests.conftest import make_settings, new_client
from tests.support.api import all_messages, assert_error, chat, create_conversation, running_server, user_client
from tests.support.conversation import DEADLINE, SUMMARY_LINE, pairs
from tests.support.instances import running_instances
from tests.support.live import LiveServer, iter_sse
from tests.support.redis_proc import RedisProcess, running_redis

WINDOW = 6


def said(prompt: list[ChatMessage]) -> list[tuple[str, str]]:
    """(role, text) of prompt messages without the context block (memories recalled in the
    background may or may not be there yet; what is tested here is the history)."""
    return [(m.role, split_context(m.content)[1]) for m in prompt]


def _url(conversation: str, message: int, action: str) -> str:
    return f"/v1/conversations/{conversation}/messages/{message}/{action}"


async def _regenerate(client: httpx.AsyncClient, conversation: str, message: int) -> dict[str, Any]:
    response = await client.post(_url(conversation, message, "regenerate"), json={"stream": False})
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


async def _edit(client: httpx.AsyncClient, conversation: str, message: int, content: str) -> dict[str, Any]:
    response = await client.post(_url(conversation, message, "edit"), json={"content": content, "stream": False})
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


async def _activate(client: httpx.AsyncClient, conversation: str, message: int) -> int:
    response = await client.post(_url(conversation, message, "activate"))
    assert response.status_code == 200, response.text
    return int(response.json()["head_id"])


async def test_regenerate_streams_a_new_reply_and_keeps_the_old_one(
    client: httpx.AsyncClient, provider: ScriptedProvider
):
    conversation = (await create_conversation(client))["id"]
    provider.queue("First answer.")
    first = await chat(client, conversation, "Hello!")
    original_prompt = provider.prompts[-1]

    provider.queue("Second answer, longer.")
    async with asyncio.timeout(DEADLINE):
        async with client.stream("POST", _url(conversation, first["message_id"], "regenerate")) as response:
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
            events = [event async for event in iter_sse(response)]
    assert events[0].event == "message" and events[0].json()["user_message_id"] == first["user_message_id"]
    assert "".join(e.json()["text"] for e in events if e.event == "token") == "Second answer, longer."
    done = events[-1].json()
    assert events[-1].event == "done" and done["user_message_id"] == first["user_message_id"]
    assert done["usage"]["completion_tokens"] == 3
    assert said(provider.prompts[-1]) == said(original_prompt)  # the same question, asked again

    path = await all_messages(client, conversation)
    assert [m["content"] for m in path] == ["Hello!", "Second answer, longer."]
    assert path[1]["siblings"] == [first["message_id"], done["message_id"]]
    assert path[1]["prompt_tokens"] == done["usage"]["prompt_tokens"]

    # Swipe back: the first answer is what the next prompt sees.
    assert await _activate(client, conversation, first["message_id"]) == first["message_id"]
    assert [m["content"] for m in await all_messages(client, conversation)] == ["Hello!", "First answer."]
    await chat(client, conversation, "And then?")
    assert said(provider.prompts[-1][1:]) == [
        ("user", "Hello!"),
        ("assistant", "First answer."),
        ("user", "And then?"),
    ]
    # Regenerating by the user message's id works too, and the title came from the first message.
    third = await _regenerate(client, conversation, first["user_message_id"])
    path = await all_messages(client, conversation)
    assert path[-1]["id"] == third["message_id"] and len(path[-1]["siblings"]) == 3
    assert (await client.get(f"/v1/conversations/{conversation}")).json()["title"] == "Hello!"


async def test_editing_a_message_starts_a_branch_and_both_stay(client: httpx.AsyncClient, provider: ScriptedProvider):
    conversation = (await create_conversation(client))["id"]
    await chat(client, conversation, "I like cats.")
    second = await chat(client, conversation, "Tell me about lions.")
    await chat(client, conversation, "And tigers?")

    edited = await _edit(client, conversation, second["user_message_id"], "Tell me about wolves.")
    assert said(provider.prompts[-1][1:]) == [
        ("user", "I like cats."),
        ("assistant", "You said: I like cats."),
        ("user", "Tell me about wolves."),
    ]
    path = await all_messages(client, conversation)
    assert [m["content"] for m in path][2:] == ["Tell me about wolves.", edited["content"]]
    assert path[2]["siblings"] == [second["user_message_id"], edited["user_message_id"]]

    tree = (await client.get(f"/v1/conversations/{conversation}/messages", params={"tree": True, "limit": 200})).json()
    assert len(tree["data"]) == 8 and all("parent_id" in m for m in tree["data"])

    # Back to the old branch, whole: down to its newest reply.
    await _activate(client, conversation, second["user_message_id"])
    assert [m["content"] for m in await all_messages(client, conversation)][2:] == [
        "Tell me about lions.",
        "You said: Tell me about lions.",
        "And tigers?",
        "You said: And tigers?",
    ]
    await chat(client, conversation, "Bears?")
    assert ("user", "Tell me about wolves.") not in said(provider.prompts[-1])
    assert said(provider.prompts[-1])[-2] == ("assistant", "You said: And tigers?")

    # Editing the first message branches from the very start.
    root = await _edit(client, conversation, second["user_message_id"] - 2, "I like dogs.")
    assert said(provider.prompts[-1][1:]) == [("user", "I like dogs.")]
    assert [m["content"] for m in await all_messages(client, conversation)] == ["I like dogs.", root["content"]]


async def test_branch_routes_refuse_what_they_cannot_do(server: LiveServer, client: httpx.AsyncClient):
    conversation = (await create_conversation(client))["id"]
    done = await chat(client, conversation, "Hi.")
    assert_error(
        await client.post(_url(conversation, done["message_id"], "edit"), json={"content": "x"}), 422, "cannot_edit"
    )
    assert_error(await client.post(_url(conversation, 10**9, "regenerate")), 404, "message_not_found")
    assert_error(await client.post(_url(conversation, 10**9, "activate")), 404, "message_not_found")
    for action in ("regenerate", "activate"):
        assert_error(await client.post(_url(conversation, 2**63, action)), 422)
        assert_error(await client.post(_url(conversation, 0, action)), 422)
    assert_error(await client.post(_url(conversation, done["user_message_id"], "edit"), json={"content": " "}), 422)
    other_conversation = (await create_conversation(client))["id"]
    assert_error(await client.post(_url(other_conversation, done["message_id"], "regenerate")), 404)
    async with await new_client(server, "mallory") as other:
        assert_error(await other.post(_url(conversation, done["message_id"], "regenerate")), 404)
        assert_error(await other.post(_url(conversation, done["message_id"], "activate")), 404)
        assert_error(await other.post(_url(conversation, done["user_message_id"], "edit"), json={"content": "x"}), 404)
    assert [m["content"] for m in await all_messages(client, conversation)] == ["Hi.", "You said: Hi."]


async def test_a_greeting_cannot_be_regenerated_but_can_be_swiped(client: httpx.AsyncClient):
    card = b'{"spec":"chara_card_v2","spec_version":"2.0","data":{"name":"Greeter","first_mes":"Hi!","alternate_greetings":["Yo!"]}}'
    assert (await client.post("/v1/personalities/import", content=card)).status_code == 201
    conversation = (await create_conversation(client, "greeter"))["id"]
    [greeting] = await all_messages(client, conversation)
    assert_error(await client.post(_url(conversation, greeting["id"], "regenerate")), 422, "cannot_regenerate")
    await _activate(client, conversation, greeting["siblings"][1])
    assert [m["content"] for m in await all_messages(client, conversation)] == ["Yo!"]


@pytest.fixture(params=["redis", "in-process"])
async def redis_or_none(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "in-process":
        yield None
        return
    async with running_redis(tmp_path / "redis") as server:
        yield server


async def test_switching_branches_rebuilds_the_buffer_on_two_instances(
    database_url: str, tmp_path: Path, redis_or_none: RedisProcess | None
):
    values: dict[str, Any] = {"short_term_memory_size": WINDOW, "summary_batch": 2}
    if redis_or_none is not None:
        values.update(redis_enabled=True, redis_url=redis_or_none.url, redis_breaker_reset_seconds=0.2)
    settings = make_settings(database_url, tmp_path, **values)
    async with asyncio.timeout(120), running_instances(settings, count=2) as (a, b), AsyncExitStack() as stack:
        key = (await a.services.users.create("ana")).api_key
        on_a = await stack.enter_async_context(a.client(key))
        on_b = await stack.enter_async_context(b.client(key))
        conversation = (await create_conversation(on_a))["id"]
        turns = [await chat(on_a if n % 2 else on_b, conversation, f"Message {n}.") for n in range(5)]
        # Both instances have served the conversation (each has a buffer when Redis is off).
        a.provider.queue("Another take on message 4.")
        regenerated = await _regenerate(on_a, conversation, turns[4]["message_id"])
        edited = await _edit(on_a, conversation, turns[3]["user_message_id"], "Message 3, edited.")

        async def prompt_follows_the_path(client: httpx.AsyncClient, provider: ScriptedProvider, text: str) -> None:
            before = len(provider.prompts)
            done = await chat(client, conversation, text)
            path = [m for m in await all_messages(client, conversation) if m["id"] <= done["user_message_id"]]
            assert said(provider.prompts[before][1:]) == pairs(path[-WINDOW:])

        await prompt_follows_the_path(on_b, b.provider, "After the edit, on B.")
        await _activate(on_b, conversation, turns[4]["message_id"])  # the original reply to message 4
        await prompt_follows_the_path(on_a, a.provider, "Back on the old branch, on A.")
        await _activate(on_a, conversation, regenerated["message_id"])
        await prompt_follows_the_path(on_b, b.provider, "On the regenerated branch, on B.")
        await _activate(on_b, conversation, edited["user_message_id"])
        await prompt_follows_the_path(on_a, a.provider, "On the edited branch, on A.")
        path = await all_messages(on_a, conversation)
        assert "Message 3, edited." in [m["content"] for m in path]
        assert "Message 4." not in [m["content"] for m in path]


def summary_in(prompt: list[ChatMessage]) -> str:
    """The running summary in a prompt's context block (on the newest user message), or ""."""
    newest = prompt[-1].content
    return newest.split(SUMMARY_LINE, 1)[1].split("\n", 1)[0] if SUMMARY_LINE in newest else ""


async def test_the_running_summary_follows_the_active_path(database_url: str, tmp_path: Path):
    settings = make_settings(database_url, tmp_path, short_term_memory_size=WINDOW, summary_batch=2)
    provider = ScriptedProvider()
    async with running_server(settings, provider) as server, user_client(server, "ana") as client:
        services = server.app.state.services
        conversation = (await create_conversation(client))["id"]
        turns = []
        for n in range(8):
            turns.append(await chat(client, conversation, f"Old fact number {n}."))
            await services.summarizer.wait_idle()
        assert "Old fact number 0." in summary_in(provider.prompts[-1])

        # Edit the second message: of the old branch's summaries, only what is still on the path (the
        # first exchange) may be in the prompt.
        await _edit(client, conversation, turns[1]["user_message_id"], "A new beginning.")
        summary = summary_in(provider.prompts[-1])
        assert all(f"Old fact number {n}." not in summary for n in range(1, 8)), summary
        await services.summarizer.wait_idle()
        await chat(client, conversation, "Still on the new branch.")
        assert all(f"Old fact number {n}." not in summary_in(provider.prompts[-1]) for n in range(1, 8))

        # Back on the old branch, its summary is back.
        await _activate(client, conversation, turns[1]["user_message_id"])
        await chat(client, conversation, "Back again.")
        assert "Old fact number 1." in summary_in(provider.prompts[-1])
        async with services.database.session() as session:
            rows = (await session.execute(select(ConversationSummary.id))).scalars().all()
        assert len(rows) >= 3  # summaries are only ever added


async def test_a_regenerated_reply_is_a_run_that_can_be_stopped_and_resumed(
    client: httpx.AsyncClient, provider: ScriptedProvider
):
    conversation = (await create_conversation(client))["id"]
    first = await chat(client, conversation, "Tell me a story.")
    provider.queue(ScriptedReply("Once upon a time there was", hang_after=3))
    request = client.build_request("POST", _url(conversation, first["message_id"], "regenerate"))
    response = await client.send(request, stream=True)
    try:
        events = iter_sse(response)
        async with asyncio.timeout(DEADLINE):
            opened = await anext(events)
            tokens = [await anext(events) for _ in range(3)]
        message_id = opened.json()["message_id"]
        assert opened.json()["user_message_id"] == first["user_message_id"]
        assert "".join(t.json()["text"] for t in tokens) == "Once upon a "
        # ... and stoppable.
        stopped = await client.post(f"/v1/conversations/{conversation}/messages/{message_id}/stop")
        assert stopped.status_code == 200 and stopped.json()["status"] == "stopped"
        async with asyncio.timeout(DEADLINE):
            rest = [event async for event in events]
    finally:
        await response.aclose()
    assert rest[-1].event == "done" and rest[-1].json()["finish_reason"] == "stopped"
    # Resumable from another connection like any reply: replayed after its first event, to its end.
    async with client.stream(
        "GET", f"/v1/conversations/{conversation}/messages/{message_id}/stream", headers={"Last-Event-ID": "0"}
    ) as resumed:
        assert resumed.status_code == 200
        replayed = [event async for event in iter_sse(resumed)]
    assert "".join(e.json()["text"] for e in replayed if e.event == "token") == "Once upon a "
    assert replayed[-1].event == "done"
    path = await all_messages(client, conversation)
    assert (path[-1]["id"], path[-1]["status"], path[-1]["content"]) == (message_id, "stopped", "Once upon a ")
    assert path[-1]["siblings"] == [first["message_id"], message_id]
