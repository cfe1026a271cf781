"""`/v1/memories`: list, search by meaning, add, delete one, forget everything; one user never sees
or deletes another's memories; bad input gets a 4xx in the one error shape and changes nothing."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from companion.llm.scripted import ScriptedProvider
from tests.conftest import make_settings, new_client
from tests.support.api import assert_error, running_server
from tests.support.instances import metric_value
from tests.support.live import LiveServer


async def add(client: httpx.AsyncClient, text: str) -> dict[str, Any]:
    response = await client.post("/v1/memories", json={"text": text})
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


async def listed(client: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    response = await client.get("/v1/memories", params=params)
    assert response.status_code == 200, response.text
    return response.json()["data"]  # type: ignore[no-any-return]


async def test_add_list_search_delete(client: httpx.AsyncClient) -> None:
    tea = await add(client, "I prefer green tea to coffee.")
    berlin = await add(client, "My sister Ana lives in Berlin.")
    assert (tea["text"], tea["kind"]) == ("I prefer green tea to coffee.", "note")  # as written, not rewritten
    assert {m["id"] for m in await listed(client)} == {tea["id"], berlin["id"]}

    found = await listed(client, query="Where does my sister live?", limit=1)
    assert [m["id"] for m in found] == [berlin["id"]]
    assert 0 < found[0]["score"] <= 1

    assert (await client.delete(f"/v1/memories/{berlin['id']}")).status_code == 204
    assert [m["id"] for m in await listed(client)] == [tea["id"]]
    assert_error(await client.delete(f"/v1/memories/{berlin['id']}"), 404, "memory_not_found")

    response = await client.delete("/v1/memories")
    assert response.json() == {"deleted": 1}
    assert await listed(client) == []
    assert (await client.delete("/v1/memories")).json() == {"deleted": 0}


async def test_a_near_duplicate_updates_instead_of_adding(client: httpx.AsyncClient) -> None:
    first = await add(client, "I love hiking in the Alps.")
    again = await add(client, "I love hiking in the Alps!")
    assert again["id"] == first["id"]
    assert len(await listed(client)) == 1


async def test_one_user_cannot_see_search_or_delete_anothers_memories(
    server: LiveServer, client: httpx.AsyncClient
) -> None:
    secret = await add(client, "My bank PIN hint is my first cat's name.")
    async with await new_client(server, "mallory") as mallory:
        assert await listed(mallory) == []
        assert await listed(mallory, query="bank PIN hint") == []
        assert_error(await mallory.delete(f"/v1/memories/{secret['id']}"), 404, "memory_not_found")
        assert (await mallory.delete("/v1/memories")).json() == {"deleted": 0}
    assert [m["id"] for m in await listed(client)] == [secret["id"]]


async def test_memories_need_authentication(anon: httpx.AsyncClient) -> None:
    assert_error(await anon.get("/v1/memories"), 401)
    assert_error(await anon.delete("/v1/memories"), 401)


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status"),
    [
        ("get", "/v1/memories", {"params": {"query": "x" * 1001}}, 422),
        ("get", "/v1/memories", {"params": {"query": "   "}}, 422),
        ("get", "/v1/memories", {"params": {"query": "bad\x00byte"}}, 422),
        ("get", "/v1/memories", {"params": {"limit": 0}}, 422),
        ("get", "/v1/memories", {"params": {"limit": 100_000}}, 422),
        ("get", "/v1/memories", {"params": {"offset": -1}}, 422),
        ("post", "/v1/memories", {"json": {"text": ""}}, 422),
        ("post", "/v1/memories", {"json": {"text": " \t "}}, 422),
        ("post", "/v1/memories", {"json": {"text": "x" * 301}}, 422),
        ("post", "/v1/memories", {"json": {"text": "nul\x00inside"}}, 422),
        ("post", "/v1/memories", {"json": {"text": "ok", "user_id": str(uuid.uuid4())}}, 422),
        ("post", "/v1/memories", {"json": {"text": 5}}, 422),
        ("post", "/v1/memories", {"json": ["not", "an", "object"]}, 422),
        ("post", "/v1/memories", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 422),
        ("get", "/v1/memories", {"params": {"kind": "secrets"}}, 422),
        ("delete", "/v1/memories", {"params": {"message_id": 0}}, 422),
        ("delete", "/v1/memories", {"params": {"conversation_id": "x"}}, 422),
        ("delete", "/v1/memories/not-a-uuid", {}, 422),
        ("delete", "/v1/memories/companion:v1:{u:x}:memsearch", {}, 422),
        ("delete", f"/v1/memories/{uuid.uuid4()}", {}, 404),
    ],
)
async def test_bad_input_is_a_clear_4xx_and_changes_nothing(
    client: httpx.AsyncClient, method: str, path: str, kwargs: dict[str, Any], status: int
) -> None:
    kept = await add(client, "I am learning to play the violin.")
    response = await client.request(method.upper(), path, **kwargs)
    assert_error(response, status)
    assert [m["id"] for m in await listed(client)] == [kept["id"]]


async def test_hostile_but_valid_text_is_stored_verbatim_and_searchable(client: httpx.AsyncClient) -> None:
    texts = [
        "My favourite word is «Schadenfreude» 🙂",
        "companion:v1:{u:00000000-0000-0000-0000-000000000000}:memsearch:0 is my server name",
        "Robert'); DROP TABLE memories;-- is my nickname",
    ]
    stored = [await add(client, text) for text in texts]
    assert {m["text"] for m in await listed(client)} == {m["text"] for m in stored}
    found = await listed(client, query="DROP TABLE", limit=1)
    assert found[0]["id"] == stored[2]["id"]


async def test_with_memory_turned_off_on_the_server_stored_memories_can_still_be_listed_and_deleted(
    database_url: str, tmp_path: Path
) -> None:
    # Memories stored while memory was on; then the server restarts with MEMORY_ENABLED=false.
    async with running_server(make_settings(database_url, tmp_path), ScriptedProvider()) as live:
        user = await live.app.state.services.users.create("u")
        headers = {"Authorization": f"Bearer {user.api_key}"}
        async with httpx.AsyncClient(base_url=live.base_url, headers=headers, timeout=30) as http:
            tea = await add(http, "I like green tea.")
            sister = await add(http, "My sister lives in Lisbon.")
            bike = await add(http, "I ride a red bicycle to work.")

    settings = make_settings(database_url, tmp_path, memory_enabled=False)
    async with running_server(settings, ScriptedProvider()) as live:
        async with httpx.AsyncClient(base_url=live.base_url, headers=headers, timeout=30) as http:
            assert_error(await http.post("/v1/memories", json={"text": "I like tea."}), 409, "memory_disabled")
            assert_error(await http.get("/v1/memories", params={"query": "tea"}), 409, "memory_disabled")
            assert {m["id"] for m in await listed(http)} == {tea["id"], sister["id"], bike["id"]}
            assert (await http.delete(f"/v1/memories/{sister['id']}")).status_code == 204
            assert {m["id"] for m in await listed(http)} == {tea["id"], bike["id"]}
            assert (await http.delete("/v1/memories")).json() == {"deleted": 2}
            assert await listed(http) == []


async def test_metrics_count_memories_written(client: httpx.AsyncClient, anon: httpx.AsyncClient) -> None:
    await add(client, "I am a night owl.")
    await add(client, "I am a night owl!")  # the same fact again: an update
    text = (await anon.get("/metrics")).text
    assert metric_value(text, "companion_memory_written_total", action="added") == 1
    assert metric_value(text, "companion_memory_written_total", action="updated") == 1
