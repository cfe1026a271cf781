"""The cache layer through the real app: real uvicorn instances sharing one database and a private
redis-server (never the shared one on 6379). Edits made through one instance are served by the other
(pub/sub invalidation of L1; how fast is measured in bench/, not here: two instances on one event loop
of a loaded machine say nothing about it), warm chat context loads run no personality or preference
query, a cold-cache stampede runs one query, /metrics counts hits per namespace and tier, sessions
work as bearer tokens, and the cache works through Redis AUTH, ACL users and TLS without ever
showing a password."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from companion.cache import keys
from companion.config import Settings
from companion.llm.scripted import ScriptedProvider
from companion.personalities.schemas import PersonalityCreate
from companion.services import Services
from companion.users.service import CreatedUser
from tests.conftest import make_settings
from tests.support.api import chat, create_conversation, create_personality
from tests.support.instances import (
    DEADLINE,
    Instance,
    metric_value,
    running_instances,
    served_within,
    statement_log,
)
from tests.support.redis_proc import RedisProcess, TlsFiles, make_tls_files, running_redis

PERSONALITY_TABLES = ("personalities", "preferences")
latencies: dict[str, list[float]] = {}  # printed with `-s`, for the record


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisProcess]:
    async with running_redis(tmp_path / "redis") as server:
        yield server


@pytest.fixture(params=["redis", "in-process"])
def cache_mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def cache_settings(cache_mode: str, database_url: str, tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    """Settings for `cache_mode`: Redis (a private server) or the in-process backend."""
    if cache_mode == "in-process":
        return make_settings(database_url, tmp_path, redis_enabled=False)
    server: RedisProcess = request.getfixturevalue("redis_server")
    return make_settings(database_url, tmp_path, redis_enabled=True, redis_url=server.url)


@pytest.fixture
async def started_services(cache_settings: Settings) -> AsyncIterator[Services]:
    built = Services.build(cache_settings, provider=ScriptedProvider())
    await built.start()
    if built.listener is not None:
        await asyncio.wait_for(built.listener.connected.wait(), DEADLINE)
    yield built
    await built.aclose()


async def new_user(instance: Instance, name: str = "alice") -> CreatedUser:
    return await instance.services.users.create(name)


def record(kind: str, seconds: float) -> None:
    latencies.setdefault(kind, []).append(seconds)
    print(f"invalidation latency {kind}: {seconds * 1000:.1f} ms")


def version_is(version: int) -> Any:
    return lambda r: r.status_code == 200 and r.json()["version"] == version


# --- 1. edits through A are served by B ----------------------------------------------------------


async def test_edits_through_one_instance_are_served_by_the_other(
    database_url: str, tmp_path: Path, redis_server: RedisProcess
):
    settings = make_settings(database_url, tmp_path, redis_enabled=True, redis_url=redis_server.url)
    async with running_instances(settings) as (a, b), AsyncExitStack() as stack:
        await a.wait_channel_connected()
        await b.wait_channel_connected()
        key = (await new_user(a)).api_key
        ca = await stack.enter_async_context(a.client(key))
        cb = await stack.enter_async_context(b.client(key))
        loop = asyncio.get_running_loop()
        b_stats = b.services.cache.stats["personality"]

        await create_personality(ca, "quill", system_prompt="You are Quill, version one.")
        # Warm B: the first read loads it, the second must come from B's L1.
        assert (await cb.get("/v1/personalities/quill")).json()["version"] == 1
        l1_before = b_stats.l1_hits
        assert (await cb.get("/v1/personalities/quill")).json()["version"] == 1
        assert b_stats.l1_hits == l1_before + 1, "B did not serve from its L1: the test would prove nothing"

        # PATCH through A: B serves version 2 (within the generous DEADLINE of `served_within`).
        patched = await ca.patch("/v1/personalities/quill", json={"system_prompt": "You are Quill, version two."})
        assert patched.status_code == 200, patched.text
        elapsed = await served_within(lambda: cb.get("/v1/personalities/quill"), version_is(2), started=loop.time())
        record("patch", elapsed)
        served = (await cb.get("/v1/personalities/quill")).json()
        assert served["system_prompt"] == "You are Quill, version two." and served["version"] == 2
        assert (await ca.get("/v1/personalities/quill")).json()["version"] == 2

        # A cached miss on B ("vega" unknown, twice: the second from L1) ends when A creates it.
        assert (await cb.get("/v1/personalities/vega")).status_code == 404
        assert (await cb.get("/v1/personalities/vega")).status_code == 404
        created = await ca.post(
            "/v1/personalities", json={"name": "vega", "description": "Vega.", "system_prompt": "You are Vega."}
        )
        assert created.status_code == 201, created.text
        elapsed = await served_within(
            lambda: cb.get("/v1/personalities/vega"), lambda r: r.status_code == 200, started=loop.time()
        )
        record("create after cached miss", elapsed)

        # DELETE through A: B answers 404.
        deleted = await ca.delete("/v1/personalities/quill")
        assert deleted.status_code == 204, deleted.text
        elapsed = await served_within(
            lambda: cb.get("/v1/personalities/quill"), lambda r: r.status_code == 404, started=loop.time()
        )
        record("delete", elapsed)

        # Shadowing a global personality through A: B serves the user's own one.
        for _ in range(2):
            served = (await cb.get("/v1/personalities/elara")).json()
            assert served["scope"] == "global"
        await create_personality(ca, "elara", system_prompt="You are my own Elara.")
        elapsed = await served_within(
            lambda: cb.get("/v1/personalities/elara"),
            lambda r: r.status_code == 200 and r.json()["scope"] == "user",
            started=loop.time(),
        )
        record("shadow a global", elapsed)
        assert (await cb.get("/v1/personalities/elara")).json()["system_prompt"] == "You are my own Elara."

        # Deleting the shadow through A: the global one shows through on B again.
        assert (await ca.delete("/v1/personalities/elara")).status_code == 204
        elapsed = await served_within(
            lambda: cb.get("/v1/personalities/elara"),
            lambda r: r.status_code == 200 and r.json()["scope"] == "global",
            started=loop.time(),
        )
        record("delete a shadow", elapsed)

        # A conversation on B with the user's personality uses its current prompt, not a cached one.
        await create_personality(ca, "lyra", system_prompt="You are Lyra, first draft.")
        conversation = await create_conversation(cb, "lyra")
        await chat(cb, conversation["id"], "Hello")
        assert (await ca.patch("/v1/personalities/lyra", json={"system_prompt": "You are Lyra, final."})).is_success
        await chat(cb, conversation["id"], "Hello again")
        assert b.provider.prompts[-1][0].content.startswith("You are Lyra, final.")


# --- 2. preferences put through A shape the next chat on B ----------------------------------------


async def test_preferences_put_through_one_instance_shape_the_next_chat_on_the_other(
    database_url: str, tmp_path: Path, redis_server: RedisProcess
):
    settings = make_settings(database_url, tmp_path, redis_enabled=True, redis_url=redis_server.url)
    async with running_instances(settings) as (a, b), AsyncExitStack() as stack:
        await a.wait_channel_connected()
        await b.wait_channel_connected()
        key = (await new_user(a)).api_key
        ca = await stack.enter_async_context(a.client(key))
        cb = await stack.enter_async_context(b.client(key))
        conversation = await create_conversation(cb, "elara")
        await chat(cb, conversation["id"], "Hi")  # B caches the (default) preferences
        assert "Address the user as" not in b.provider.prompts[-1][0].content
        prefs_stats = b.services.cache.stats["prefs"]
        l1_before = prefs_stats.l1_hits
        assert (await cb.get("/v1/preferences")).json()["preferred_name"] is None
        assert prefs_stats.l1_hits == l1_before + 1, "B did not cache the preferences"

        put = await ca.put(
            "/v1/preferences", json={"preferred_name": "Captain", "language": "Portuguese", "tone": "formal"}
        )
        assert put.status_code == 200, put.text
        await chat(cb, conversation["id"], "Hi again")
        system = b.provider.prompts[-1][0].content
        assert "Address the user as Captain." in system, system
        assert "Always reply in Portuguese." in system and "polite, formal tone" in system, system
        assert (await cb.get("/v1/preferences")).json()["preferred_name"] == "Captain"

        # And back again, the other way round.
        assert (await cb.put("/v1/preferences", json={"preferred_name": "Skipper"})).is_success
        await chat(ca, conversation["id"], "Third")
        assert "Address the user as Skipper." in a.provider.prompts[-1][0].content


# --- 3. warm context loads run no personality or preference query ---------------------------------


WARM_TURNS = 300


async def test_warm_turn_set_ups_run_no_personality_or_preference_query(started_services: Services, cache_mode: str):
    """Every load goes through `ChatService.begin`, the real turn set-up (it stores the message,
    reads the history, the summary and the memories, and builds the prompt): a few hundred of them,
    since each stores a message, rather than a thousand through a copy of its context assembly."""
    services = started_services
    user = await services.users.create("alice")
    await services.personalities.create(
        user.id,
        PersonalityCreate(name="quill", description="Quill.", system_prompt="You are Quill."),
    )
    conversations = [
        await services.conversations.create(user.id, "quill"),
        await services.conversations.create(user.id, "elara"),
    ]
    system_prompts = ["You are Quill.", "You are Elara"]
    with statement_log(services) as log:
        # Cold: the first turn of each conversation loads its personality (the log does see them).
        for conversation in conversations:
            await (await services.chat.begin(user.id, conversation, "warm up")).release()
        assert len(log.touching("personalities")) == 2, log.statements
        assert len(log.touching("preferences")) == 1, log.statements
        log.clear()

        for index in range(WARM_TURNS):
            conversation = conversations[index % 2]
            # The full turn set-up: stores the message, reads the history, builds the prompt.
            turn = await services.chat.begin(user.id, conversation, f"message {index}")
            await turn.release()  # not run: give the conversation back
            assert turn.prompt[-1].content == f"message {index}"
            assert turn.prompt[0].content.startswith(system_prompts[index % 2])

        assert log.touching(*PERSONALITY_TABLES) == [], log.touching(*PERSONALITY_TABLES)[:5]
        assert log.touching("messages"), "the statement log saw nothing: the check would prove nothing"
    stats = services.cache.stats
    assert stats["personality"].l1_hits >= WARM_TURNS and stats["prefs"].l1_hits >= WARM_TURNS
    assert stats["personality"].misses == 2 and stats["prefs"].misses == 1
    if cache_mode == "redis":
        assert services.redis is not None and services.redis.breaker.state == "closed"


async def test_warm_chat_turns_over_http_run_no_personality_or_preference_query(
    cache_settings: Settings, cache_mode: str
):
    async with running_instances(cache_settings, count=1) as (a,), AsyncExitStack() as stack:
        if cache_mode == "redis":
            await a.wait_channel_connected()
        client = await stack.enter_async_context(a.client((await new_user(a)).api_key))
        await create_personality(client, "quill")
        conversation = await create_conversation(client, "quill")
        await chat(client, conversation["id"], "warm up")
        with statement_log(a.services) as log:
            for index in range(20):
                await chat(client, conversation["id"], f"turn {index}")
                assert (await client.get("/v1/personalities/quill")).status_code == 200
                assert (await client.get("/v1/preferences")).status_code == 200
        assert log.touching(*PERSONALITY_TABLES) == [], log.touching(*PERSONALITY_TABLES)[:5]
        assert log.touching("api_keys") == [], "API keys must be served from the cache too"
        assert len(log.touching("messages")) >= 20


# --- 4. a stampede on a cold cache runs one query ---------------------------------------------------


async def test_a_hundred_concurrent_resolves_on_a_cold_cache_run_one_query(started_services: Services):
    services = started_services
    user = await services.users.create("alice")
    with statement_log(services) as log:
        results = await asyncio.gather(*(services.personalities.resolve(user.id, "elara") for _ in range(100)))
        preferences = await asyncio.gather(*(services.preferences.get(user.id) for _ in range(100)))
    assert len(log.touching("personalities")) == 1, log.touching("personalities")
    assert len(log.touching("preferences")) == 1, log.touching("preferences")
    assert {r.id for r in results} == {results[0].id} and results[0].name == "elara"
    assert len(set(preferences)) == 1


async def test_a_stampede_across_two_instances_runs_one_query(
    database_url: str, tmp_path: Path, redis_server: RedisProcess
):
    """The loader lock in Redis: the other instance waits for the loading one's value."""
    settings = make_settings(database_url, tmp_path, redis_enabled=True, redis_url=redis_server.url)
    built = [Services.build(settings, provider=ScriptedProvider()) for _ in range(2)]
    async with AsyncExitStack() as stack:
        for services in built:
            await services.start()
            stack.push_async_callback(services.aclose)
            assert services.listener is not None
            await asyncio.wait_for(services.listener.connected.wait(), DEADLINE)
        user = await built[0].users.create("alice")
        with statement_log(built[0]) as log_a, statement_log(built[1]) as log_b:
            results = await asyncio.gather(
                *(built[i % 2].personalities.resolve(user.id, "orion") for i in range(100)),
            )
        queries = log_a.touching("personalities") + log_b.touching("personalities")
        assert len(queries) == 1, queries
        assert {r.id for r in results} == {results[0].id}


# --- 7. metrics ----------------------------------------------------------------------------------


async def test_metrics_count_cache_hits_by_namespace_and_tier(
    database_url: str, tmp_path: Path, redis_server: RedisProcess
):
    settings = make_settings(database_url, tmp_path, redis_enabled=True, redis_url=redis_server.url)
    async with running_instances(settings) as (a, b), AsyncExitStack() as stack:
        await a.wait_channel_connected()
        await b.wait_channel_connected()
        key = (await new_user(a)).api_key
        ca = await stack.enter_async_context(a.client(key))
        cb = await stack.enter_async_context(b.client(key))
        await create_personality(ca, "quill")

        def hits(text: str, tier: str, namespace: str = "personality") -> float:
            return metric_value(text, "companion_cache_hits_total", namespace=namespace, tier=tier)

        before = await a.metrics_text()
        assert metric_value(before, "companion_redis_degraded") == 0
        for _ in range(5):
            assert (await ca.get("/v1/personalities/quill")).status_code == 200
        after = await a.metrics_text()
        # The first read loads from the database (a miss), the next four are L1 hits.
        miss = "companion_cache_misses_total"
        assert (
            metric_value(after, miss, namespace="personality")
            == metric_value(before, miss, namespace="personality") + 1
        )
        assert hits(after, "l1") == hits(before, "l1") + 4
        assert hits(after, "l1", "apikey") >= hits(before, "l1", "apikey") + 5  # every request authenticates
        count = "companion_cache_get_seconds_count"
        assert (
            metric_value(after, count, namespace="personality")
            >= metric_value(before, count, namespace="personality") + 5
        )

        # B finds A's value in Redis (an L2 hit), then serves from its own L1.
        b_before = await b.metrics_text()
        for _ in range(3):
            assert (await cb.get("/v1/personalities/quill")).status_code == 200
        b_after = await b.metrics_text()
        assert hits(b_after, "l2") == hits(b_before, "l2") + 1
        assert hits(b_after, "l1") == hits(b_before, "l1") + 2
        assert metric_value(b_after, miss, namespace="personality") == metric_value(
            b_before, miss, namespace="personality"
        )
        assert metric_value(b_after, "companion_redis_degraded") == 0
        assert metric_value(b_after, "companion_cache_errors_total", namespace="personality") == 0


# --- 8. sessions over HTTP -------------------------------------------------------------------------


async def test_sessions_are_bearer_tokens_listed_and_revocable_only_by_their_owner(
    cache_settings: Settings, cache_mode: str
):
    count = 2 if cache_mode == "redis" else 1  # with Redis, a session made on A works on B
    async with running_instances(cache_settings, count=count) as instances, AsyncExitStack() as stack:
        a, b = instances[0], instances[-1]
        if cache_mode == "redis":
            for instance in instances:
                await instance.wait_channel_connected()
        alice_key = (await new_user(a, "alice")).api_key
        alice = await stack.enter_async_context(a.client(alice_key))
        mallory = await stack.enter_async_context(b.client((await new_user(a, "mallory")).api_key))

        created = await alice.post("/v1/sessions", headers={"User-Agent": "pytest-browser"})
        assert created.status_code == 201, created.text
        body = created.json()
        token, session_id = body["token"], body["session"]["id"]
        assert token.startswith("cms_") and body["expires_in"] > 0
        assert body["session"]["user_agent"] == "pytest-browser"
        assert "secret_hash" not in body["session"]

        by_session = await stack.enter_async_context(b.client(token))
        assert (await by_session.get("/v1/personalities/elara")).status_code == 200
        assert (await by_session.get("/v1/preferences")).status_code == 200
        listed = await by_session.get("/v1/sessions")
        assert listed.status_code == 200, listed.text
        assert [s["id"] for s in listed.json()] == [session_id]
        assert all("secret_hash" not in s for s in listed.json())
        assert (await mallory.get("/v1/sessions")).json() == []

        # Someone else cannot revoke it (it is not theirs: 404), and it keeps working.
        assert (await mallory.delete(f"/v1/sessions/{session_id}")).status_code == 404
        assert (await by_session.get("/v1/preferences")).status_code == 200
        # A forged token for the same session (wrong secret) is refused.
        forged = token.rsplit(".", 1)[0] + "." + secrets.token_urlsafe(24)
        async with b.client(forged) as bad:
            assert (await bad.get("/v1/preferences")).status_code == 401

        # Its owner revokes it (through the other instance): the token stops working everywhere.
        assert (await alice.delete(f"/v1/sessions/{session_id}")).status_code == 204
        for instance in instances:
            async with instance.client(token) as revoked:
                response = await revoked.get("/v1/preferences")
                assert response.status_code == 401, response.text
                assert response.json()["error"]["code"] == "invalid_session"
        assert (await alice.get("/v1/sessions")).json() == []
        assert (await alice.delete(f"/v1/sessions/{session_id}")).status_code == 404
        assert (await alice.get("/v1/preferences")).status_code == 200  # the API key is unaffected


# --- 6. Redis AUTH, ACL users and TLS through the URL -----------------------------------------------


def assert_no_secret(text: str, *secrets_: str) -> None:
    for secret in secrets_:
        assert secret not in text, f"a secret appears in: {text[:500]}"
    assert "redis://" not in text and "rediss://" not in text, text[:500]


async def assert_cache_works_over(database_url: str, tmp_path: Path, url: str, *secrets_: str) -> None:
    """An instance configured with `url` reports Redis ok and really caches in that Redis."""
    settings = make_settings(database_url, tmp_path, redis_enabled=True, redis_url=url)
    async with running_instances(settings, count=1) as (a,), AsyncExitStack() as stack:
        await a.wait_channel_connected()
        health = await a.health()
        assert health["status"] == "ok" and health["checks"]["redis"]["status"] == "ok", health
        user = await new_user(a)
        client = await stack.enter_async_context(a.client(user.api_key))
        for _ in range(2):
            assert (await client.get("/v1/personalities/elara")).status_code == 200
        conversation = await create_conversation(client)
        await chat(client, conversation["id"], "Hello over a protected Redis")
        direct = aioredis.Redis.from_url(url)
        try:
            assert await direct.get(keys.personality(user.id, "elara")) is not None, "nothing was cached in Redis"
        finally:
            await direct.aclose()
        assert await a.metric("companion_redis_degraded") == 0
        assert await a.metric("companion_cache_errors_total", namespace="personality") == 0
        assert_no_secret(str(await a.health()), *secrets_)
        assert_no_secret(await a.metrics_text(), *secrets_)
        assert_no_secret((await client.get("/v1/personalities/nope")).text, *secrets_)


async def assert_serves_degraded_with(database_url: str, tmp_path: Path, url: str, *secrets_: str) -> None:
    """A wrong credential: the app starts and serves from the database, says degraded, hides secrets."""
    settings = make_settings(database_url, tmp_path, redis_enabled=True, redis_url=url)
    async with running_instances(settings, count=1) as (a,), AsyncExitStack() as stack:
        client = await stack.enter_async_context(a.client((await new_user(a)).api_key))
        for _ in range(4):  # enough failures to open the circuit
            response = await client.get("/v1/personalities/elara")
            assert response.status_code == 200, response.text
        conversation = await create_conversation(client)
        assert (await client.put("/v1/preferences", json={"preferred_name": "Ann"})).status_code == 200
        assert (await chat(client, conversation["id"], "Hello"))["content"] == "You said: Hello"
        assert (await client.get("/v1/preferences")).json()["preferred_name"] == "Ann"
        created = await client.post("/v1/sessions")  # sessions fall back to this process
        assert created.status_code == 201, created.text
        health_response = await a.http.get("/health")
        assert health_response.status_code == 200
        health = health_response.json()
        assert health["status"] == "degraded" and health["checks"]["redis"]["status"] == "down", health
        assert health["checks"]["redis"]["invalidation_channel"] == "disconnected"
        assert await a.metric("companion_redis_degraded") == 1
        bodies = [
            health_response.text,
            await a.metrics_text(),
            (await client.get("/v1/personalities/nope")).text,
            (await a.http.get("/v1/preferences", headers={"Authorization": "Bearer cmp_wrong"})).text,
        ]
        for text in bodies:
            assert_no_secret(text, *secrets_)


def with_credentials(server: RedisProcess, user: str, password: str) -> str:
    return server.url.replace("://", f"://{user}:{password}@", 1)


async def test_redis_with_a_password(database_url: str, tmp_path: Path):
    password = secrets.token_hex(16)
    async with running_redis(tmp_path / "redis", args=["--requirepass", password]) as server:
        await assert_cache_works_over(database_url, tmp_path, with_credentials(server, "", password), password)
        wrong = secrets.token_hex(16)
        await assert_serves_degraded_with(database_url, tmp_path, with_credentials(server, "", wrong), password, wrong)


async def test_redis_with_an_acl_user(database_url: str, tmp_path: Path):
    """An ACL user limited to companion's keys and channels, without dangerous commands; the
    default user is off, so nothing works without the right user and password."""
    password = secrets.token_hex(16)
    acl = ["--user", "default", "off",
           "--user", "app", "on", f">{password}", "~companion:*", "&companion:*", "+@all", "-@dangerous"]  # fmt: skip
    async with running_redis(tmp_path / "redis", args=acl) as server:
        await assert_cache_works_over(database_url, tmp_path, with_credentials(server, "app", password), password)
        wrong = secrets.token_hex(16)
        await assert_serves_degraded_with(
            database_url, tmp_path, with_credentials(server, "app", wrong), password, wrong
        )
        await assert_serves_degraded_with(  # no user: the default user is off
            database_url, tmp_path, with_credentials(server, "", password), password
        )


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("redis-tls"))


async def test_redis_over_tls(database_url: str, tmp_path: Path, tls_files: TlsFiles):
    async with running_redis(tmp_path / "redis", tls=tls_files) as server:
        assert server.url.startswith("rediss://")
        # Verifying the server against our CA (hostname included), and without verification.
        await assert_cache_works_over(database_url, tmp_path, f"{server.url}?ssl_ca_certs={tls_files.ca_cert}")
        await assert_cache_works_over(database_url, tmp_path, f"{server.url}?ssl_cert_reqs=none")
        # Plain text to a TLS port, or TLS without trusting the CA: serving, degraded.
        await assert_serves_degraded_with(database_url, tmp_path, server.url.replace("rediss", "redis"))
        await assert_serves_degraded_with(database_url, tmp_path, server.url)
