"""Conversations and their messages over HTTP: create, list, read, delete, page through history,
and the short-term memory that goes into each prompt."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select

from companion.llm.context import split_context
from companion.llm.scripted import ScriptedProvider
from companion.services import Services
from companion.storage.models import Message
from tests.conftest import make_settings
from tests.support.api import (
    all_messages,
    assert_error,
    chat,
    create_conversation,
    create_personality,
    running_server,
    user_client,
)


async def _ids(client: httpx.AsyncClient, **params: Any) -> list[str]:
    response = await client.get("/v1/conversations", params=params)
    assert response.status_code == 200, response.text
    return [c["id"] for c in response.json()["data"]]


async def _stored_message_count(services: Services, conversation_id: str) -> int:
    async with services.database.session() as session:
        query = select(func.count()).select_from(Message).where(Message.conversation_id == uuid.UUID(conversation_id))
        return int((await session.execute(query)).scalar_one())


async def test_create_and_get_a_conversation(client: httpx.AsyncClient):
    created = await create_conversation(client, "orion", title="Stars")
    assert set(created) == {"id", "personality", "title", "created_at", "updated_at"}
    assert (created["personality"], created["title"]) == ("orion", "Stars")
    response = await client.get(f"/v1/conversations/{created['id']}")
    assert response.status_code == 200
    assert response.json() == created
    untitled = await create_conversation(client, "elara")
    assert untitled["title"] is None


async def test_create_with_an_unknown_personality_is_404_and_stores_nothing(client: httpx.AsyncClient):
    response = await client.post("/v1/conversations", json={"personality": "nobody"})
    assert_error(response, 404, "personality_not_found")
    assert await _ids(client) == []


async def test_get_an_unknown_conversation_is_404(client: httpx.AsyncClient):
    response = await client.get("/v1/conversations/00000000-0000-4000-8000-000000000000")
    assert_error(response, 404, "conversation_not_found")


async def test_list_is_newest_first_and_a_new_message_moves_a_conversation_up(client: httpx.AsyncClient):
    first, second, third = [await create_conversation(client, "elara") for _ in range(3)]
    assert await _ids(client) == [third["id"], second["id"], first["id"]]

    await chat(client, first["id"], "Remember me?")
    assert await _ids(client) == [first["id"], third["id"], second["id"]]


async def test_list_filters_by_personality(client: httpx.AsyncClient):
    elara = [(await create_conversation(client, "elara"))["id"] for _ in range(2)]
    orion = (await create_conversation(client, "orion"))["id"]
    await create_personality(client, "pirate")
    pirate = (await create_conversation(client, "pirate"))["id"]

    assert await _ids(client, personality="elara") == elara[::-1]
    assert await _ids(client, personality="orion") == [orion]
    assert await _ids(client, personality="pirate") == [pirate]
    assert await _ids(client, personality="luna") == []
    assert await _ids(client, personality="Not A Name!") == []
    assert len(await _ids(client)) == 4


async def test_list_pages_with_limit_offset_and_has_more(client: httpx.AsyncClient):
    newest_first = [(await create_conversation(client, "elara"))["id"] for _ in range(5)][::-1]

    pages = []
    for offset in (0, 2, 4):
        response = await client.get("/v1/conversations", params={"limit": 2, "offset": offset})
        pages.append(response.json())
    assert [p["has_more"] for p in pages] == [True, True, False]
    assert [c["id"] for page in pages for c in page["data"]] == newest_first

    exact = (await client.get("/v1/conversations", params={"limit": 5})).json()
    assert exact["has_more"] is False and len(exact["data"]) == 5
    beyond = (await client.get("/v1/conversations", params={"offset": 5})).json()
    assert beyond == {"data": [], "has_more": False}


async def test_delete_removes_the_conversation_and_its_messages(app_services: Services, client: httpx.AsyncClient):
    doomed = await create_conversation(client, "elara")
    kept = await create_conversation(client, "elara")
    for conversation in (doomed, kept):
        await chat(client, conversation["id"], "Hello")
    assert await _stored_message_count(app_services, doomed["id"]) == 2

    response = await client.delete(f"/v1/conversations/{doomed['id']}")
    assert response.status_code == 204 and response.content == b""

    assert_error(await client.get(f"/v1/conversations/{doomed['id']}"), 404, "conversation_not_found")
    assert_error(await client.get(f"/v1/conversations/{doomed['id']}/messages"), 404, "conversation_not_found")
    assert_error(await client.delete(f"/v1/conversations/{doomed['id']}"), 404, "conversation_not_found")
    assert await _stored_message_count(app_services, doomed["id"]) == 0
    assert await _ids(client) == [kept["id"]]
    assert len(await all_messages(client, kept["id"])) == 2


async def test_message_cursors_page_through_everything_in_order(client: httpx.AsyncClient):
    conversation_id = (await create_conversation(client, "elara"))["id"]
    for n in range(7):
        await chat(client, conversation_id, f"message {n}")
    everything = await all_messages(client, conversation_id)
    assert len(everything) == 14
    ids = [m["id"] for m in everything]
    assert ids == sorted(set(ids))
    assert [m["role"] for m in everything] == ["user", "assistant"] * 7
    assert [m["content"] for m in everything[::2]] == [f"message {n}" for n in range(7)]
    assert [m["content"] for m in everything[1::2]] == [f"You said: message {n}" for n in range(7)]
    url = f"/v1/conversations/{conversation_id}/messages"

    # Default: the newest page, in chronological order.
    newest = (await client.get(url, params={"limit": 3})).json()
    assert newest["data"] == everything[-3:] and newest["has_more"] is True

    # Backwards with `before`, from the newest page to the oldest.
    backwards: list[list[dict[str, Any]]] = [newest["data"]]
    has_more = newest["has_more"]
    while has_more:
        page = (await client.get(url, params={"limit": 3, "before": backwards[-1][0]["id"]})).json()
        assert page["data"], "has_more promised another page"
        backwards.append(page["data"])
        has_more = page["has_more"]
    assert [m for page in reversed(backwards) for m in page] == everything
    assert [len(page) for page in backwards] == [3, 3, 3, 3, 2]

    # Forwards with `after`, from the start.
    forwards: list[dict[str, Any]] = []
    cursor, has_more = 0, True
    while has_more:
        page = (await client.get(url, params={"limit": 4, "after": cursor})).json()
        assert page["data"], "has_more promised another page"
        forwards.extend(page["data"])
        cursor, has_more = page["data"][-1]["id"], page["has_more"]
    assert forwards == everything

    # Past either end: an empty page.
    assert (await client.get(url, params={"after": ids[-1]})).json() == {"data": [], "has_more": False}
    assert (await client.get(url, params={"before": ids[0]})).json() == {"data": [], "has_more": False}


async def test_message_pages_of_an_empty_conversation(client: httpx.AsyncClient):
    conversation_id = (await create_conversation(client, "elara"))["id"]
    response = await client.get(f"/v1/conversations/{conversation_id}/messages")
    assert response.status_code == 200
    assert response.json() == {"data": [], "has_more": False}


async def test_prompt_holds_only_the_last_short_term_memory_messages(
    database_url: str, tmp_path: Path, provider: ScriptedProvider
):
    settings = make_settings(database_url, tmp_path, short_term_memory_size=4)
    async with running_server(settings, provider) as live:
        async with user_client(live, "alice") as client:
            conversation_id = (await create_conversation(client, "elara"))["id"]
            for n in range(6):
                await chat(client, conversation_id, f"turn {n}")
                stored = await all_messages(client, conversation_id)
                # What the model saw: the newest 4 messages before its reply, ending with the new one.
                expected = [(m["role"], m["content"]) for m in stored[:-1][-4:]]
                prompt = provider.prompts[-1]
                assert prompt[0].role == "system"
                # The newest message may open with the service's context block (the date, the running
                # summary of what fell out of the window: docs/memory.md); the rest is what was said.
                said = [(m.role, split_context(m.content)[1]) for m in prompt[1:]]
                assert said == expected
                assert all(split_context(m.content)[0] == "" for m in prompt[1:-1])
                assert prompt[-1].role == "user" and said[-1][1] == f"turn {n}"
            assert len(provider.prompts[-1]) == 1 + 4
