"""Bounded per user (issue 15, item 7): personalities, conversations, sessions and API keys per user
have caps (settings) with a clear 409 past them, which hold exactly when creates race (on two
instances at once); with Redis off, one user signing in in a loop can neither evict other users'
sessions from the in-process store nor crowd them out. (Sessions racing in Redis: tests/cache/test_sessions.py.)"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from companion.config import Settings
from companion.errors import Conflict
from companion.llm.scripted import ScriptedProvider
from companion.personalities.schemas import PersonalityCreate
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


async def _race(create: Callable[[Services, int], Awaitable[object]], instances: list[Services], attempts: int) -> int:
    """`attempts` creates at once, spread over the instances; how many were refused with a 409."""
    results = await asyncio.gather(
        *(create(instances[index % len(instances)], index) for index in range(attempts)), return_exceptions=True
    )
    failures = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(f, Conflict) for f in failures), failures
    return len(failures)


async def test_concurrent_creates_on_two_instances_stop_exactly_at_the_cap(database_url: str, tmp_path: Path) -> None:
    """Count-then-insert let every create in flight see room under the cap; the user's row is now
    locked for the count, so exactly the cap is stored and every other create is answered 409."""
    cap, attempts = 3, 16
    settings = make_settings(
        database_url,
        tmp_path,
        personalities_max_per_user=cap,
        conversations_max_per_user=cap,
        api_keys_max_per_user=cap + 1,  # the key the user was created with is one of them
    )
    instances = [Services.build(settings, provider=ScriptedProvider()) for _ in range(2)]
    try:
        user = (await instances[0].users.create("racer")).id

        async def personality(services: Services, index: int) -> object:
            body = PersonalityCreate(name=f"p{index}", description="x", system_prompt="x")
            return await services.personalities.create(user, body)

        async def conversation(services: Services, index: int) -> object:
            return await services.conversations.create(user, "elara")

        async def api_key(services: Services, index: int) -> object:
            return await services.users.create_key(user, f"key {index}")

        refused = await _race(personality, instances, attempts)
        mine = [p for p in await instances[0].personalities.list_visible(user) if p.scope == "user"]
        assert (len(mine), refused) == (cap, attempts - cap)

        refused = await _race(conversation, instances, attempts)
        held, _ = await instances[1].conversations.list(user, limit=100)
        assert (len(held), refused) == (cap, attempts - cap)

        refused = await _race(api_key, instances, attempts)
        active = [k for k in await instances[0].users.list_keys(user) if k.revoked_at is None]
        assert (len(active), refused) == (cap + 1, attempts - cap)
    finally:
        for services in instances:
            await services.aclose()
