"""Authentication, and one user's data being invisible and untouchable to another."""

from __future__ import annotations

import re
import uuid

import httpx
import pytest

from companion.llm.scripted import ScriptedProvider
from companion.sessions.service import TOKEN_PREFIX as SESSION_PREFIX
from tests.support.api import (
    assert_error,
    chat,
    create_conversation,
    create_personality,
    snapshot,
    user_client,
)
from tests.support.live import LiveServer

# Plausible path parameters, so that only the missing key is wrong; any other parameter gets a hex id.
PATH_VALUES = {"conversation_id": "00000000-0000-4000-8000-000000000000", "name": "elara"}


def _v1_routes(server: LiveServer) -> list[tuple[str, str]]:
    """Every /v1 operation, from the app's own OpenAPI schema, so a new route is covered too."""
    routes = []
    for path, operations in server.app.openapi()["paths"].items():
        if path.startswith("/v1"):
            concrete = re.sub(r"\{(\w+)\}", lambda m: PATH_VALUES.get(m.group(1), "0123456789abcdef"), path)
            routes.extend((method.upper(), concrete) for method in sorted(operations))
    return routes


async def test_every_v1_route_needs_an_api_key(server: LiveServer, anon: httpx.AsyncClient):
    routes = _v1_routes(server)
    assert len(routes) >= 15, routes  # every native and OpenAI-compatible route, found from the app itself
    for method, path in routes:
        # A body that would be valid, so that only the missing key is wrong.
        body = {"personality": "elara"} if path == "/v1/conversations" else {}
        response = await anon.request(method, path, json=body if method in ("POST", "PUT", "PATCH") else None)
        error = assert_error(response, 401, "missing_api_key")
        assert error["type"] == "authentication_error", (method, path)
        assert response.headers["www-authenticate"] == "Bearer", (method, path)


WRONG_AUTHORIZATIONS = [
    ("unknown-key", "Bearer cmp_not-a-real-key"),
    ("foreign-format", "Bearer not-our-format"),
    ("very-long", "Bearer cmp_" + "x" * 500),
    ("basic-scheme", "Basic YWxpY2U6c2VjcmV0"),
    ("bearer-without-key", "Bearer"),
    ("unknown-session-token", f"Bearer {SESSION_PREFIX}not-a-session"),
]


async def test_a_wrong_key_is_401(anon: httpx.AsyncClient, subtests: pytest.Subtests):
    for case, authorization in WRONG_AUTHORIZATIONS:
        for path in ("/v1/personalities", "/v1/conversations", "/v1/models"):
            with subtests.test(case, path=path):
                response = await anon.get(path, headers={"Authorization": authorization})
                assert_error(response, 401)
                assert response.headers["www-authenticate"] == "Bearer"


async def test_a_revealed_key_prefix_is_not_a_key(anon: httpx.AsyncClient, api_key: str):
    response = await anon.get("/v1/personalities", headers={"Authorization": f"Bearer {api_key[:-1]}"})
    assert_error(response, 401, "invalid_api_key")
    good = await anon.get("/v1/personalities", headers={"Authorization": f"Bearer {api_key}"})
    assert good.status_code == 200


async def test_another_users_conversation_is_404_and_left_unchanged(
    server: LiveServer, client: httpx.AsyncClient, provider: ScriptedProvider
):
    conversation_id = (await create_conversation(client, "elara"))["id"]
    await chat(client, conversation_id, "A secret only for me")
    before = await snapshot(client)
    prompts_before = len(provider.prompts)

    async with user_client(server, "bob") as bob:
        url = f"/v1/conversations/{conversation_id}"
        assert_error(await bob.get(url), 404, "conversation_not_found")
        assert_error(await bob.get(f"{url}/messages"), 404, "conversation_not_found")
        assert_error(await bob.post(f"{url}/messages", json={"content": "hi", "stream": False}), 404)
        assert_error(await bob.post(f"{url}/messages", json={"content": "hi"}), 404)
        assert_error(await bob.delete(url), 404, "conversation_not_found")
        completion = await bob.post(
            "/v1/chat/completions",
            json={
                "model": "elara",
                "messages": [{"role": "user", "content": "hi"}],
                "conversation_id": conversation_id,
            },
        )
        assert_error(completion, 404, "conversation_not_found")
        # Not owned looks exactly like not existing.
        missing = await bob.get(f"/v1/conversations/{uuid.uuid4()}")
        assert (await bob.get(url)).json() == missing.json()

    assert await snapshot(client) == before
    assert len(provider.prompts) == prompts_before


async def test_conversation_lists_hold_only_your_own(server: LiveServer, client: httpx.AsyncClient):
    mine = await create_conversation(client, "elara")
    async with user_client(server, "bob") as bob:
        assert (await bob.get("/v1/conversations")).json() == {"data": [], "has_more": False}
        assert (await bob.get("/v1/conversations", params={"personality": "elara"})).json()["data"] == []
        theirs = await create_conversation(bob, "elara")
        assert [c["id"] for c in (await bob.get("/v1/conversations")).json()["data"]] == [theirs["id"]]
    assert [c["id"] for c in (await client.get("/v1/conversations")).json()["data"]] == [mine["id"]]


async def test_another_users_personalities_are_invisible_and_untouchable(server: LiveServer, client: httpx.AsyncClient):
    await create_personality(client, "pirate", system_prompt="Alice's pirate.")
    await create_personality(client, "elara", system_prompt="Alice's own Elara.")
    before = await snapshot(client)

    async with user_client(server, "bob") as bob:
        listed = (await bob.get("/v1/personalities")).json()
        assert len(listed) == 8 and all(p["scope"] == "global" for p in listed)
        assert "pirate" not in [m["id"] for m in (await bob.get("/v1/models")).json()["data"]]
        assert_error(await bob.get("/v1/personalities/pirate"), 404, "personality_not_found")
        assert_error(await bob.patch("/v1/personalities/pirate", json={"description": "Bob's now."}), 404)
        assert_error(await bob.delete("/v1/personalities/pirate"), 404, "personality_not_found")
        assert_error(await bob.post("/v1/conversations", json={"personality": "pirate"}), 404)
        assert (await bob.get("/v1/personalities/elara")).json()["scope"] == "global"
        assert_error(await bob.delete("/v1/personalities/elara"), 404, "personality_not_found")
        # Names are per user: Bob may have a pirate of his own.
        bobs = await create_personality(bob, "pirate", system_prompt="Bob's pirate.")
        assert bobs["system_prompt"] == "Bob's pirate."

    assert await snapshot(client) == before


async def test_preferences_are_per_user(server: LiveServer, client: httpx.AsyncClient, provider: ScriptedProvider):
    await client.put("/v1/preferences", json={"preferred_name": "Alice", "interests": ["knitting"]})
    before = await snapshot(client)

    async with user_client(server, "bob") as bob:
        defaults = (await bob.get("/v1/preferences")).json()
        assert defaults["preferred_name"] is None and defaults["interests"] == []
        await chat(bob, (await create_conversation(bob, "elara"))["id"], "Hello")
        assert "Alice" not in provider.prompts[-1][0].content
        assert "knitting" not in provider.prompts[-1][0].content
        assert (await bob.put("/v1/preferences", json={"preferred_name": "Bob"})).status_code == 200

    assert await snapshot(client) == before
