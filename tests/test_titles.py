"""Conversation titles come from the first message on every route (native, OpenAI-compatible),
on SQLite and PostgreSQL; a title given at creation is kept."""

from __future__ import annotations

import httpx

from companion.conversations.service import title_from
from tests.support.api import chat, create_conversation


async def test_titles_come_from_the_first_message_on_every_route(client: httpx.AsyncClient):
    native = (await create_conversation(client))["id"]
    await chat(client, native, "  Planning a trip to Lisbon\nwith my sister in May.")
    await chat(client, native, "Something else entirely.")
    assert (await client.get(f"/v1/conversations/{native}")).json()["title"] == "Planning a trip to Lisbon"

    response = await client.post(
        "/v1/chat/completions",
        json={"model": "orion", "messages": [{"role": "user", "content": "Why is the sky blue? " * 10}]},
    )
    assert response.status_code == 200, response.text
    conversation = await client.get(f"/v1/conversations/{response.json()['conversation_id']}")
    title = conversation.json()["title"]
    assert title.startswith("Why is the sky blue?") and title.endswith("…") and len(title) <= 60

    named = (await create_conversation(client, title="Mine"))["id"]
    await chat(client, named, "Hello.")
    assert (await client.get(f"/v1/conversations/{named}")).json()["title"] == "Mine"


def test_title_from():
    assert title_from("Short one") == "Short one"
    assert title_from("a  b\tc") == "a b c"
    assert len(title_from("x" * 500)) == 60
