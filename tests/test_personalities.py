"""Personalities over HTTP: the eight globals, a user's own, and shadowing a global by name."""

from __future__ import annotations

import httpx

from companion.llm.scripted import ScriptedProvider
from companion.personalities.builtin import BUILTIN_PERSONALITIES
from companion.services import Services
from tests.support.api import all_messages, assert_error, chat, create_conversation, create_personality, user_client
from tests.support.live import LiveServer

ELARA_PROMPT = next(p.system_prompt for p in BUILTIN_PERSONALITIES if p.name == "elara")
MY_ELARA_PROMPT = "You are my own Elara, who speaks only in haiku."


async def test_eight_distinct_global_personalities_at_first_start(client: httpx.AsyncClient):
    response = await client.get("/v1/personalities")
    assert response.status_code == 200
    personalities = response.json()
    assert len(personalities) == 8
    assert all(p["scope"] == "global" and p["version"] == 1 for p in personalities)
    names = [p["name"] for p in personalities]
    assert "elara" in names
    for field in ("name", "display_name", "description", "system_prompt"):
        values = [p[field] for p in personalities]
        assert len(set(values)) == 8, f"{field} is not distinct: {values}"
        assert all(v.strip() for v in values)


async def test_restart_does_not_duplicate_or_overwrite_globals(app_services: Services, client: httpx.AsyncClient):
    before = (await client.get("/v1/personalities")).json()
    assert await app_services.personalities.ensure_builtins() == 0
    assert (await client.get("/v1/personalities")).json() == before


async def test_user_creates_reads_updates_and_deletes_own_personality(client: httpx.AsyncClient):
    created = await create_personality(
        client, "pirate", system_prompt="You are a pirate.", description="Talks like a pirate."
    )
    assert created["scope"] == "user" and created["version"] == 1
    assert created["display_name"] == "Pirate"
    assert (created["system_prompt"], created["description"]) == ("You are a pirate.", "Talks like a pirate.")

    read = await client.get("/v1/personalities/pirate")
    assert read.status_code == 200 and read.json() == created
    assert "pirate" in [p["name"] for p in (await client.get("/v1/personalities")).json()]

    patched = await client.patch("/v1/personalities/pirate", json={"system_prompt": "You are a polite pirate."})
    assert patched.status_code == 200, patched.text
    assert patched.json()["version"] == 2
    assert patched.json()["system_prompt"] == "You are a polite pirate."
    assert patched.json()["description"] == "Talks like a pirate."  # fields left out are kept
    patched = await client.patch("/v1/personalities/pirate", json={"display_name": "Captain", "description": "Arr."})
    assert patched.json()["version"] == 3
    assert (await client.get("/v1/personalities/pirate")).json() == patched.json()

    deleted = await client.delete("/v1/personalities/pirate")
    assert deleted.status_code == 204 and deleted.content == b""
    assert_error(await client.get("/v1/personalities/pirate"), 404, "personality_not_found")
    assert_error(await client.delete("/v1/personalities/pirate"), 404, "personality_not_found")
    assert "pirate" not in [p["name"] for p in (await client.get("/v1/personalities")).json()]


async def test_empty_patch_changes_nothing(client: httpx.AsyncClient):
    created = await create_personality(client, "pirate")
    patched = await client.patch("/v1/personalities/pirate", json={})
    assert patched.status_code == 200
    assert patched.json() == created


async def test_duplicate_personality_name_is_a_conflict(client: httpx.AsyncClient):
    original = await create_personality(client, "pirate", system_prompt="The first one.")
    again = await client.post(
        "/v1/personalities", json={"name": "pirate", "description": "Another.", "system_prompt": "The second one."}
    )
    assert_error(again, 409, "personality_exists")
    assert (await client.get("/v1/personalities/pirate")).json() == original


async def test_own_personality_named_like_a_global_shadows_it_for_that_user_only(
    server: LiveServer, client: httpx.AsyncClient
):
    mine = await create_personality(client, "elara", system_prompt=MY_ELARA_PROMPT)
    assert mine["scope"] == "user"

    assert (await client.get("/v1/personalities/elara")).json() == mine
    listed = (await client.get("/v1/personalities")).json()
    assert len(listed) == 8
    assert [p for p in listed if p["name"] == "elara"] == [mine]

    async with user_client(server, "bob") as bob:
        theirs = (await bob.get("/v1/personalities/elara")).json()
        assert theirs["scope"] == "global" and theirs["system_prompt"] == ELARA_PROMPT
        assert all(p["scope"] == "global" for p in (await bob.get("/v1/personalities")).json())


async def test_chat_uses_the_users_shadowing_system_prompt(
    server: LiveServer, client: httpx.AsyncClient, provider: ScriptedProvider
):
    conversation = await create_conversation(client, "elara")  # made before the shadow: follows the name
    await create_personality(client, "elara", system_prompt=MY_ELARA_PROMPT)
    await chat(client, conversation["id"], "Hello")
    assert provider.prompts[-1][0].role == "system"
    assert provider.prompts[-1][0].content.startswith(MY_ELARA_PROMPT)
    assert ELARA_PROMPT not in provider.prompts[-1][0].content

    async with user_client(server, "bob") as bob:
        await chat(bob, (await create_conversation(bob, "elara"))["id"], "Hello")
    assert provider.prompts[-1][0].content.startswith(ELARA_PROMPT)


async def test_deleting_the_shadow_lets_the_global_show_through(client: httpx.AsyncClient, provider: ScriptedProvider):
    await create_personality(client, "elara", system_prompt=MY_ELARA_PROMPT)
    conversation = await create_conversation(client, "elara")
    assert (await client.delete("/v1/personalities/elara")).status_code == 204

    seen = (await client.get("/v1/personalities/elara")).json()
    assert seen["scope"] == "global" and seen["system_prompt"] == ELARA_PROMPT
    await chat(client, conversation["id"], "Are you still there?")
    assert provider.prompts[-1][0].content.startswith(ELARA_PROMPT)
    # Only the user's own copy was deleted; the global one cannot be.
    assert_error(await client.delete("/v1/personalities/elara"), 404, "personality_not_found")


async def test_patch_or_delete_of_a_global_the_user_does_not_own_is_404(client: httpx.AsyncClient):
    before = (await client.get("/v1/personalities/orion")).json()
    patch = await client.patch("/v1/personalities/orion", json={"system_prompt": "You are evil now."})
    assert_error(patch, 404, "personality_not_found")
    assert_error(await client.delete("/v1/personalities/orion"), 404, "personality_not_found")
    assert (await client.get("/v1/personalities/orion")).json() == before


async def test_chatting_with_an_own_personality_uses_its_prompt(client: httpx.AsyncClient, provider: ScriptedProvider):
    await create_personality(client, "pirate", system_prompt="You are a pirate.")
    conversation = await create_conversation(client, "pirate")
    assert conversation["personality"] == "pirate"
    await chat(client, conversation["id"], "Ahoy")
    assert provider.prompts[-1][0].content.startswith("You are a pirate.")


async def test_conversation_with_a_deleted_own_personality_reports_404(
    client: httpx.AsyncClient, provider: ScriptedProvider
):
    await create_personality(client, "pirate")
    conversation = await create_conversation(client, "pirate")
    await client.delete("/v1/personalities/pirate")
    response = await client.post(
        f"/v1/conversations/{conversation['id']}/messages", json={"content": "Ahoy", "stream": False}
    )
    assert_error(response, 404, "personality_not_found")
    assert provider.prompts == []
    assert await all_messages(client, conversation["id"]) == []
