"""MEMORY_MAX_PER_USER (docs/memory.md): at the cap a manual add is a 422 `too_many_memories` that
stores nothing, extraction from chat adds nothing (and fails nothing), a near-duplicate still
updates the memory it repeats, the cap is per user, and deleting makes room again."""

from __future__ import annotations

from pathlib import Path

import httpx

from companion.llm.scripted import ScriptedProvider
from tests.conftest import make_settings
from tests.support.api import assert_error, chat, create_conversation, running_server

CAP = 2


async def add(http: httpx.AsyncClient, text: str) -> httpx.Response:
    return await http.post("/v1/memories", json={"text": text})


async def texts(http: httpx.AsyncClient) -> set[str]:
    response = await http.get("/v1/memories")
    assert response.status_code == 200, response.text
    return {m["text"] for m in response.json()["data"]}


async def test_memories_stop_at_the_cap_per_user(database_url: str, tmp_path: Path) -> None:
    settings = make_settings(database_url, tmp_path, memory_max_per_user=CAP)
    async with running_server(settings, ScriptedProvider()) as live:
        services = live.app.state.services
        keys = [(await services.users.create(name)).api_key for name in ("alice", "bob")]
        clients = [
            httpx.AsyncClient(base_url=live.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
            for key in keys
        ]
        alice, bob = clients
        try:
            tea = await add(alice, "I like green tea.")
            assert tea.status_code == 201, tea.text
            assert (await add(alice, "My sister Ana lives in Berlin.")).status_code == 201

            refused = await add(alice, "I play the cello every Sunday.")
            error = assert_error(refused, 422, "too_many_memories")
            assert str(CAP) in error["message"]
            full = {"I like green tea.", "My sister Ana lives in Berlin."}
            assert await texts(alice) == full

            # A near-duplicate of a kept memory is an update, not an addition: allowed at the cap.
            again = await add(alice, "I like green tea!")
            assert again.status_code == 201 and again.json()["id"] == tea.json()["id"], again.text
            full = {"I like green tea!", "My sister Ana lives in Berlin."}
            assert await texts(alice) == full

            # Facts found in chat are not added either, and the reply is not affected.
            conversation = await create_conversation(alice)
            assert (await chat(alice, conversation["id"], "I am vegetarian."))["content"] == "You said: I am vegetarian."
            await services.memories.wait_idle()
            assert await texts(alice) == full
            assert services.memories.stats.extraction_failures == 0

            # The cap is per user.
            assert (await add(bob, "I play the cello every Sunday.")).status_code == 201

            # Deleting makes room again.
            assert (await alice.delete(f"/v1/memories/{tea.json()['id']}")).status_code == 204
            assert (await add(alice, "I play the cello every Sunday.")).status_code == 201
            assert await texts(alice) == {"My sister Ana lives in Berlin.", "I play the cello every Sunday."}
        finally:
            for client in clients:
                await client.aclose()
