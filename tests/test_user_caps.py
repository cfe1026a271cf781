"""Bounded per user (issue 15, item 7): personalities, conversations, sessions and API keys per user
have caps (settings) with a clear 409 past them; with Redis off, one user signing in in a loop can
neither evict other users' sessions from the in-process store nor crowd them out."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx

from companion.config import Settings
from companion.errors import Conflict
from companion.llm.scripted import ScriptedProvider
from companion.services import Services
from tests.conftest import make_settings
from tests.support.api import assert_error, create_conversation, create_personality, running_server


def _capped(database_url: str, tmp_path: Path) -> Settings:
    return make_settings(
        database_url,
        tmp_path,
        personalities_max_per_user=2,
        conversations_max_per_user=2,
        sessions_max_per_user=2,
    )


async def test_caps_answer_409_and_count_per_user(database_url: str, tmp_path: Path) -> None:
    async with running_server(_capped(database_url, tmp_path), ScriptedProvider()) as server:
        services: Services = server.app.state.services
        keys = [(await services.users.create(name)).api_key for name in ("alice", "bob")]
        async with (
            httpx.AsyncClient(base_url=server.base_url, headers={"Authorization": f"Bearer {keys[0]}"}) as alice,
            httpx.AsyncClient(base_url=server.base_url, headers={"Authorization": f"Bearer {keys[1]}"}) as bob,
        ):
            for name in ("one", "two"):
                await create_personality(alice, name)
            body = {"name": "three", "description": "x", "system_prompt": "x"}
            error = assert_error(await alice.post("/v1/personalities", json=body), 409, "too_many_personalities")
            assert "PERSONALITIES_MAX_PER_USER=2" in error["message"]
            await create_personality(bob, "three")  # another user's count is their own

            for _ in range(2):
                await create_conversation(alice)
            refused = await alice.post("/v1/conversations", json={"personality": "elara"})
            assert_error(refused, 409, "too_many_conversations")
            # The OpenAI route creates one only when the user has none with that personality.
            chat = {"model": "one", "messages": [{"role": "user", "content": "hi"}]}
            assert_error(await alice.post("/v1/chat/completions", json=chat), 409, "too_many_conversations")
            await create_conversation(bob)

            for _ in range(2):
                assert (await alice.post("/v1/sessions")).status_code == 201
            assert_error(await alice.post("/v1/sessions"), 409, "too_many_sessions")
            assert (await bob.post("/v1/sessions")).status_code == 201
            # Signing out of one makes room again.
            first = (await alice.get("/v1/sessions")).json()[0]["id"]
            assert (await alice.delete(f"/v1/sessions/{first}")).status_code == 204
            assert (await alice.post("/v1/sessions")).status_code == 201


async def test_with_redis_off_a_sign_in_loop_cannot_evict_other_users_sessions(
    database_url: str, tmp_path: Path
) -> None:
    settings = make_settings(database_url, tmp_path, sessions_max_per_user=5, cache_local_max_entries=100)
    services = Services.build(settings, provider=ScriptedProvider())
    try:
        bob, alice = uuid.uuid4(), uuid.uuid4()
        bob_token, _ = await services.sessions.create(bob)
        refused = 0
        for _ in range(12_000):  # more than the shared cache backend holds (10,000 entries)
            try:
                await services.sessions.create(alice)
            except Conflict:
                refused += 1
        assert refused == 12_000 - 5
        # Nor does the shared cache filling up (sessions have a store of their own).
        for index in range(12_000):
            await services.cache.backend.set(f"companion:v1:filler:{index}", b"x")
        assert await services.sessions.authenticate(bob_token) is not None
    finally:
        await services.aclose()
