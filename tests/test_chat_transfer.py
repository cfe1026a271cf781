"""Exporting and importing conversations through the routes, on SQLite and PostgreSQL: our JSON
(complete: the tree, statuses, usage, times, personality) round-trips to an identical copy; the
Markdown shows the active path; a ChatGPT conversations.json imports with its branches; bad or
oversized files are rejected and store nothing."""

from __future__ import annotations

import copy
from typing import Any

import httpx
import orjson

from companion.interchange import chats
from companion.llm.scripted import ScriptedProvider, ScriptedReply
from tests.conftest import new_client
from tests.support.api import all_messages, assert_error, chat, create_conversation, create_personality, snapshot
from tests.support.chatgpt import conversations_json
from tests.support.live import LiveServer


async def _branched_conversation(client: httpx.AsyncClient, provider: ScriptedProvider) -> str:
    """u1 a1 u2 a2, a2 regenerated (a2'), u2 edited (u2' a2''), and a reply cut short by an error."""
    conversation = (await create_conversation(client, "orion"))["id"]
    await chat(client, conversation, "Hello there.")
    second = await chat(client, conversation, "Tell me about stars.")
    regenerated = await client.post(
        f"/v1/conversations/{conversation}/messages/{second['message_id']}/regenerate", json={"stream": False}
    )
    assert regenerated.status_code == 200, regenerated.text
    edited = await client.post(
        f"/v1/conversations/{conversation}/messages/{second['user_message_id']}/edit",
        json={"content": "Tell me about planets.", "stream": False},
    )
    assert edited.status_code == 200, edited.text
    provider.queue(ScriptedReply("Planets are", fail_after=2))
    failed = await client.post(f"/v1/conversations/{conversation}/messages", json={"content": "More!", "stream": False})
    assert failed.status_code == 502
    return conversation


def _normalized(export: dict[str, Any]) -> list[dict[str, Any]]:
    """An export with ids replaced by positions: what must survive a round trip."""
    result = []
    for conversation in export["conversations"]:
        position = {m["id"]: index for index, m in enumerate(conversation["messages"])}
        result.append(
            {
                **{k: v for k, v in conversation.items() if k not in ("id", "messages", "head_id")},
                "head": position.get(conversation["head_id"]),
                "messages": [
                    {
                        **{k: v for k, v in m.items() if k not in ("id", "parent_id")},
                        "parent": position.get(m["parent_id"]),
                    }
                    for m in conversation["messages"]
                ],
            }
        )
    return result


async def test_json_export_is_complete_and_imports_to_an_identical_copy(
    client: httpx.AsyncClient, provider: ScriptedProvider
):
    conversation = await _branched_conversation(client, provider)
    response = await client.get(f"/v1/conversations/{conversation}/export")
    assert response.status_code == 200, response.text
    assert "attachment" in response.headers["content-disposition"]
    export = response.json()
    assert export["format"] == "companion.conversations" and export["version"] == 1
    [exported] = export["conversations"]
    assert exported["personality"] == "orion" and exported["title"] == "Hello there."
    messages = exported["messages"]
    assert len(messages) == 9  # u1 a1 u2 a2 a2' u2' a2'' u3 a3(error)
    assert [m["status"] for m in messages][-1] == "error"
    assert sum(1 for m in messages if m["parent_id"] == messages[2]["id"]) == 2  # a2 and a2'
    assert all(m["created_at"] and (m["role"] == "user" or m["prompt_tokens"] is not None) for m in messages)

    imported = await client.post(
        "/v1/conversations/import", content=response.content, headers={"Content-Type": "application/json"}
    )
    assert imported.status_code == 201, imported.text
    [copy_] = imported.json()
    assert copy_["id"] != conversation
    again = (await client.get(f"/v1/conversations/{copy_['id']}/export")).json()
    assert _normalized(again) == _normalized(export)
    # The copy's active path is the original's.
    original_path = [(m["role"], m["content"], m["status"]) for m in await all_messages(client, conversation)]
    copy_path = [(m["role"], m["content"], m["status"]) for m in await all_messages(client, copy_["id"])]
    assert copy_path == original_path
    # And the copy carries on from its active path.
    done = await chat(client, copy_["id"], "Go on.")
    assert [m["content"] for m in await all_messages(client, copy_["id"])][-2:] == ["Go on.", done["content"]]


async def test_export_all_and_markdown(client: httpx.AsyncClient, provider: ScriptedProvider):
    first = await _branched_conversation(client, provider)
    second = (await create_conversation(client, "luna"))["id"]
    await chat(client, second, "A calm question.")
    everything = (await client.get("/v1/conversations/export")).json()
    assert [c["id"] for c in everything["conversations"]] == [second, first]

    markdown = await client.get(f"/v1/conversations/{first}/export", params={"format": "markdown"})
    assert markdown.status_code == 200 and markdown.headers["content-type"].startswith("text/markdown")
    text = markdown.text
    assert text.startswith("# Hello there.")
    assert "Tell me about planets." in text and "Tell me about stars." not in text  # the active path only
    assert "**You**" in text and "**Orion**" in text and "*(error)*" in text
    all_markdown = (await client.get("/v1/conversations/export", params={"format": "markdown"})).text
    assert "A calm question." in all_markdown and "Tell me about planets." in all_markdown


async def test_a_chatgpt_export_imports_with_its_branches(client: httpx.AsyncClient):
    raw = orjson.dumps(conversations_json())
    response = await client.post("/v1/conversations/import", content=raw, params={"personality": "nova"})
    assert response.status_code == 201, response.text
    garden, empty = response.json()
    assert (garden["title"], garden["personality"]) == ("Autumn garden", "nova")
    assert garden["created_at"].startswith("2024-10-27")
    path = await all_messages(client, garden["id"])
    assert [(m["role"], m["content"]) for m in path] == [
        ("user", "What should I plant in October?"),
        ("assistant", "Try garlic."),
        ("user", "And in pots?"),
        ("assistant", "Pansies do well in pots."),
    ]
    assert len(path[1]["siblings"]) == 2  # the regenerated reply is an alternative
    assert await all_messages(client, empty["id"]) == []


async def test_bad_imports_store_nothing(server: LiveServer, client: httpx.AsyncClient, provider: ScriptedProvider):
    conversation = await _branched_conversation(client, provider)
    good = (await client.get(f"/v1/conversations/{conversation}/export")).json()
    before = await snapshot(client)

    def broken(change: Any) -> bytes:
        export = copy.deepcopy(good)
        change(export)
        return orjson.dumps(export)

    def second_one_bad(export: dict[str, Any]) -> None:
        bad = copy.deepcopy(export["conversations"][0])
        bad["messages"][3]["parent_id"] = 10**9
        export["conversations"].append(bad)

    cases: list[tuple[bytes, str | None, str]] = [
        (b"not json", "file", "invalid_import"),
        (b'{"something": "else"}', "file", "invalid_import"),
        (broken(lambda e: e.update(format="other")), "format", "invalid_import"),
        (broken(second_one_bad), "conversations[1].messages[3].parent_id", "invalid_import"),
        (broken(lambda e: e["conversations"][0]["messages"][0].update(role="system")), None, "invalid_import"),
        (broken(lambda e: e["conversations"][0].update(head_id=10**9)), "conversations[0].head_id", "invalid_import"),
        (broken(lambda e: e["conversations"][0].update(personality="nobody")), None, "personality_not_found"),
        (broken(lambda e: e["conversations"][0]["messages"][0].update(content="a\x00b")), None, "invalid_import"),
        (
            broken(lambda e: e["conversations"][0]["messages"][0].update(created_at="2026-01-01T00:00:00")),
            None,
            "invalid_import",
        ),
        (orjson.dumps([{"title": "no mapping"}]), "[0].mapping", "invalid_import"),
    ]
    for raw, param, code in cases:
        error = assert_error(await client.post("/v1/conversations/import", content=raw), 422, code)
        if param is not None:
            assert error["param"] == param, error
    too_big = await client.post("/v1/conversations/import", content=b" " * (chats.MAX_IMPORT_BYTES + 1))
    assert_error(too_big, 413, "body_too_large")
    assert await snapshot(client) == before


async def test_exports_are_private(server: LiveServer, client: httpx.AsyncClient):
    conversation = (await create_conversation(client))["id"]
    await chat(client, conversation, "My secret.")
    async with await new_client(server, "mallory") as other:
        assert_error(await other.get(f"/v1/conversations/{conversation}/export"), 404, "conversation_not_found")
        assert (await other.get("/v1/conversations/export")).json()["conversations"] == []
    await create_personality(client, "pirate")
    assert_error(await client.post("/v1/conversations/import", content=b"[]", params={"personality": "Bad Name"}), 422)
