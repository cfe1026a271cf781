"""Redis going away mid-run and coming back, with two real instances under a steady mix of requests:
no request fails (the database serves), /health and /metrics say degraded without showing where
Redis is, an edit made during the outage is served at once by both instances (L1 bypassed), and once
the private redis-server is back on its port everything recovers by itself, with no stale value
served, not even one left in Redis from before the outage (the server keeps its data across the
restart, as a production Redis with an append-only file would)."""

from __future__ import annotations

import asyncio
import collections
import itertools
import uuid
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import redis.asyncio as aioredis

from companion.cache import keys
from companion.llm.scripted import ScriptedReply
from tests.conftest import make_settings
from tests.support.api import create_conversation, create_personality
from tests.support.instances import DEADLINE, Instance, running_instances
from tests.support.live import wait_for
from tests.support.redis_proc import free_port, running_redis

TEST_BUDGET = 60.0  # a hang fails the test quickly instead of stalling the run
SENTINEL = "companion-test:sentinel"  # outside companion's namespace: proves Redis kept its data
HAMMER_LIMIT = 2000  # requests per worker at most: a bounded loop even if the test never stops it


@dataclass
class Outcome:
    instance: str
    kind: str
    status: int
    phase: str
    started: float
    version: int | None = None
    detail: str = ""  # the body of a failed response, or the transport error


@dataclass
class Hammer:
    """Clients sending a steady mix of requests to each instance until stopped."""

    phase: str = "before"
    outcomes: list[Outcome] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    names: set[str] = field(default_factory=set)
    kinds: set[str] = field(default_factory=set)
    in_flight: dict[str, tuple[str, str, float]] = field(default_factory=dict)  # worker -> kind, phase, start

    def start(self, name: str, requests: list[tuple[str, Callable[[], Any]]]) -> None:
        self.names.add(name)
        self.kinds.update(kind for kind, _ in requests)
        self.tasks.append(asyncio.create_task(self._run(name, requests)))

    async def _run(self, name: str, requests: list[tuple[str, Callable[[], Any]]]) -> None:
        loop = asyncio.get_running_loop()
        for _, (kind, send) in zip(range(HAMMER_LIMIT), itertools.cycle(requests), strict=False):
            if self.stop.is_set():
                return
            phase, started = self.phase, loop.time()
            self.in_flight[name] = (kind, phase, started)
            try:
                response: httpx.Response = await send()
            except httpx.TransportError as error:  # recorded, so the test reports every failure at once
                self.outcomes.append(Outcome(name, kind, 0, phase, started, detail=repr(error)))
                continue
            finally:
                self.in_flight.pop(name, None)
            version = response.json().get("version") if kind == "get quill" and response.is_success else None
            body = response.text[:300] if not response.is_success else ""
            self.outcomes.append(Outcome(name, kind, response.status_code, phase, started, version, body))

    def covered(self, phase: str, times: int = 2) -> bool:
        """Each worker sent each kind of request at least `times` times in `phase`."""
        sent = collections.Counter((o.instance, o.kind) for o in self.outcomes if o.phase == phase)
        return all(sent[(name, kind)] >= times for name in self.names for kind in self.kinds)

    async def wait_covered(self, phase: str, what: str) -> None:
        """`covered`, within the deadline; if not, the failure says what each worker was doing."""
        try:
            await wait_for(lambda: self.covered(phase), timeout=DEADLINE, what=what)
        except AssertionError:
            now = asyncio.get_running_loop().time()
            sent = collections.Counter((o.instance, o.kind, o.status) for o in self.outcomes if o.phase == phase)
            waiting = {name: (kind, started_in, f"{now - started:.1f}s") for name, (kind, started_in, started) in self.in_flight.items()}
            raise AssertionError(f"{what}: sent in {phase}: {dict(sent)}; waiting on: {waiting}") from None

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)


async def redis_get(url: str, key: str) -> bytes | None:
    """Read Redis directly (a fresh connection: the server may have restarted since the last one)."""
    async with aioredis.Redis.from_url(url) as direct:
        return await direct.get(key)  # type: ignore[no-any-return]


async def redis_set(url: str, key: str, value: bytes) -> None:
    async with aioredis.Redis.from_url(url) as direct:
        await direct.set(key, value)


def assert_nothing_revealed(text: str, port: int, *secrets: str) -> None:
    for revealing in ("redis://", "rediss://", f"127.0.0.1:{port}", f"localhost:{port}", *secrets):
        assert revealing not in text, (revealing, text[:500])


async def redis_state(instance: Instance) -> tuple[str, str, float]:
    health = await instance.health()
    return health["status"], health["checks"]["redis"]["status"], await instance.metric("companion_redis_degraded")


async def test_redis_stopping_mid_run_fails_no_request_and_everything_recovers_by_itself(
    database_url: str, tmp_path: Path
):
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(TEST_BUDGET), running_redis(tmp_path / "redis", persistent=True) as redis_server:
        settings = make_settings(
            database_url, tmp_path, redis_enabled=True, redis_url=redis_server.url, redis_breaker_reset_seconds=0.5
        )
        async with running_instances(settings) as (a, b), AsyncExitStack() as stack:
            for instance in (a, b):
                await instance.wait_channel_connected()
            alice, bob = await a.services.users.create("alice"), await a.services.users.create("bob")
            alice_a = await stack.enter_async_context(a.client(alice.api_key))
            alice_b = await stack.enter_async_context(b.client(alice.api_key))

            # Alice's personality, cached everywhere: both L1s and Redis hold version 1.
            await create_personality(alice_a, "quill", system_prompt="You are Quill, version one.")
            for client in (alice_a, alice_b, alice_a, alice_b):
                assert (await client.get("/v1/personalities/quill")).json()["version"] == 1
            quill_key = keys.personality(alice.id, "quill")
            assert orjson.loads(await redis_get(redis_server.url, quill_key))["version"] == 1
            await redis_set(redis_server.url, SENTINEL, b"kept")

            # Bob hammers both instances: chat turns, personalities, preferences read and written;
            # alice's personality is read too, to catch any stale answer.
            hammer = Hammer()
            stack.push_async_callback(hammer.finish)
            for instance in (a, b):
                bob_client = await stack.enter_async_context(instance.client(bob.api_key))
                alice_client = alice_a if instance is a else alice_b
                conversation = await create_conversation(bob_client, "orion")
                counter = itertools.count()
                hammer.start(
                    "A" if instance is a else "B",
                    [
                        ("chat", lambda c=bob_client, i=conversation["id"]: c.post(
                            f"/v1/conversations/{i}/messages", json={"content": "Tell me more", "stream": False})),
                        ("get quill", lambda c=alice_client: c.get("/v1/personalities/quill")),
                        ("get preferences", lambda c=bob_client: c.get("/v1/preferences")),
                        ("put preferences", lambda c=bob_client, n=counter: c.put(
                            "/v1/preferences", json={"preferred_name": f"Bob {next(n)}"})),
                        ("get orion", lambda c=bob_client: c.get("/v1/personalities/orion")),
                    ],
                )  # fmt: skip
            await hammer.wait_covered("before", "traffic before the outage")

            # --- the outage: Redis crashes ---------------------------------------------------------
            hammer.phase = "outage"
            await redis_server.stop(kill=True)
            for instance in (a, b):

                async def down(instance: Instance = instance) -> bool:
                    return await redis_state(instance) == ("degraded", "down", 1.0)

                await wait_for(down, timeout=DEADLINE, what=f"{instance.base_url} to report Redis down")
                health = await instance.health()
                assert health["checks"]["redis"]["invalidation_channel"] == "disconnected", health
                assert health["checks"]["database"]["status"] == "ok", health
                assert_nothing_revealed(str(health), redis_server.port)
                metrics = await instance.metrics_text()
                assert_nothing_revealed(metrics, redis_server.port)

            # An edit during the outage is served at once by both instances: no L1 is trusted now.
            patched = await alice_a.patch("/v1/personalities/quill", json={"system_prompt": "You are Quill, v2."})
            assert patched.status_code == 200 and patched.json()["version"] == 2, patched.text
            patched_at = loop.time()
            for client in (alice_b, alice_a, alice_b):
                served = (await client.get("/v1/personalities/quill")).json()
                assert (served["version"], served["system_prompt"]) == (2, "You are Quill, v2."), served
            assert await a.metric("companion_cache_pending_invalidations") >= 1  # to replay on recovery
            put = await alice_a.put("/v1/preferences", json={"preferred_name": "Alice in the outage"})
            assert put.status_code == 200, put.text
            assert (await alice_b.get("/v1/preferences")).json()["preferred_name"] == "Alice in the outage"
            await hammer.wait_covered("outage", "traffic during the outage")

            # --- Redis comes back on the same port, with its data from before the outage ----------
            hammer.phase = "recovering"
            await redis_server.start()
            assert await redis_get(redis_server.url, SENTINEL) == b"kept", (
                "Redis lost its data: the stale-L2 case is not exercised"
            )
            for instance in (a, b):

                async def recovered(instance: Instance = instance) -> bool:
                    return await redis_state(instance) == ("ok", "ok", 0.0)

                await wait_for(recovered, timeout=DEADLINE, what=f"{instance.base_url} to recover by itself")
                health = await instance.health()
                assert health["checks"]["redis"]["invalidation_channel"] == "connected", health
                assert health["checks"]["redis"]["circuit"] == "closed", health
                assert await instance.metric("companion_cache_pending_invalidations") == 0
            hammer.phase = "recovered"

            # The version-1 entry Redis kept from before the outage is gone (dropped on recovery).
            cached = await redis_get(redis_server.url, quill_key)
            assert cached is None or orjson.loads(cached)["version"] == 2, cached
            for client in (alice_a, alice_b) * 3:  # L2 and L1 of both instances
                served = (await client.get("/v1/personalities/quill")).json()
                assert (served["version"], served["system_prompt"]) == (2, "You are Quill, v2."), served
                assert (await client.get("/v1/preferences")).json()["preferred_name"] == "Alice in the outage"
            cached = await redis_get(redis_server.url, quill_key)
            assert cached is not None and orjson.loads(cached)["version"] == 2  # cached again, fresh

            # Invalidation between instances works again after the recovery.
            assert (await alice_a.patch("/v1/personalities/quill", json={"description": "After."})).is_success
            await wait_for(
                lambda: _version(alice_b, 3), timeout=DEADLINE, what="B to see an edit made after the recovery"
            )
            await hammer.wait_covered("recovered", "traffic after recovery")
            await hammer.finish()

    failed = [o for o in hammer.outcomes if not 200 <= o.status < 300]
    assert not failed, failed[:10]
    stale = [o for o in hammer.outcomes if o.kind == "get quill" and o.started > patched_at and o.version == 1]
    assert not stale, f"version 1 served after the edit: {stale[:5]}"


async def _version(client: httpx.AsyncClient, version: int) -> bool:
    response = await client.get("/v1/personalities/quill")
    return response.status_code == 200 and response.json()["version"] == version


async def test_the_app_starts_and_serves_with_redis_unreachable_from_the_start(database_url: str, tmp_path: Path):
    port = free_port()  # nothing listens there
    settings = make_settings(
        database_url,
        tmp_path,
        redis_enabled=True,
        redis_url=f"redis://127.0.0.1:{port}/0",
        redis_breaker_reset_seconds=0.5,
    )
    async with running_instances(settings, count=1) as (a,), AsyncExitStack() as stack:
        user = await a.services.users.create("alice")
        client = await stack.enter_async_context(a.client(user.api_key))
        for _ in range(3):
            assert (await client.get("/v1/personalities/elara")).status_code == 200
        await create_personality(client, "quill")
        assert (await client.get("/v1/personalities/quill")).status_code == 200
        assert (await client.put("/v1/preferences", json={"preferred_name": "Ann"})).status_code == 200
        assert (await client.get("/v1/preferences")).json()["preferred_name"] == "Ann"
        conversation = await create_conversation(client, "quill")
        reply = await client.post(
            f"/v1/conversations/{conversation['id']}/messages", json={"content": "Hi", "stream": False}
        )
        assert reply.status_code == 200, reply.text
        assert "Address the user as Ann." in a.provider.prompts[-1][0].content
        session = await client.post("/v1/sessions")
        assert session.status_code == 201, session.text
        async with a.client(session.json()["token"]) as by_session:
            assert (await by_session.get("/v1/preferences")).status_code == 200

        health_response = await a.http.get("/health")
        assert health_response.status_code == 200
        health = health_response.json()
        assert health["status"] == "degraded", health
        assert health["checks"]["redis"]["status"] == "down", health
        assert health["checks"]["redis"]["invalidation_channel"] == "disconnected", health
        assert health["checks"]["database"]["status"] == "ok", health
        assert await a.metric("companion_redis_degraded") == 1
        assert_nothing_revealed(health_response.text, port)
        assert_nothing_revealed(await a.metrics_text(), port)

        # Redis appears on that port later: the app starts using it without a restart.
        async with running_redis(tmp_path / "redis", port=port) as redis_server:

            async def recovered() -> bool:
                return await redis_state(a) == ("ok", "ok", 0.0)

            await wait_for(recovered, timeout=DEADLINE, what="the app to pick up Redis by itself")
            for _ in range(2):
                assert (await client.get("/v1/personalities/quill")).status_code == 200
            assert await redis_get(redis_server.url, keys.personality(user.id, "quill")) is not None
            # The session made while Redis was away still works (it lives in this process).
            async with a.client(session.json()["token"]) as by_session:
                assert (await by_session.get("/v1/preferences")).status_code == 200


async def test_a_turn_in_flight_when_redis_crashes_does_not_block_its_conversation_afterwards(
    database_url: str, tmp_path: Path
):
    """The conversation's turn lease was taken in Redis before the crash and could not be released
    during it; Redis comes back with it (persistence). The next message must not wait for it to
    expire (nor get 409 conversation_busy)."""
    async with asyncio.timeout(TEST_BUDGET), running_redis(tmp_path / "redis", persistent=True) as redis_server:
        settings = make_settings(
            database_url,
            tmp_path,
            redis_enabled=True,
            redis_url=redis_server.url,
            redis_breaker_reset_seconds=0.5,
            turn_wait_seconds=5,
        )
        async with running_instances(settings, count=1) as (a,), AsyncExitStack() as stack:
            await a.wait_channel_connected()
            client = await stack.enter_async_context(a.client((await a.services.users.create("alice")).api_key))
            conversation = await create_conversation(client)
            lease = keys.conversation_lock(uuid.UUID(conversation["id"]))
            gate = asyncio.Semaphore(0)
            a.provider.queue(ScriptedReply("Slow reply here.", gate=gate))
            url = f"/v1/conversations/{conversation['id']}/messages"
            in_flight = asyncio.create_task(client.post(url, json={"content": "First", "stream": False}))
            await wait_for(lambda: len(a.provider.prompts) == 1, timeout=DEADLINE, what="the turn to start")
            assert await redis_get(redis_server.url, lease) is not None, "the turn holds no lease in Redis"

            await redis_server.stop(kill=True)
            for _ in range(3):
                gate.release()
            first = await in_flight
            assert first.status_code == 200 and first.json()["content"] == "Slow reply here.", first.text
            await redis_server.start()
            assert await redis_get(redis_server.url, lease) is not None, "Redis lost the lease: nothing is tested"

            # At once, before the app has even noticed Redis is back: the next turn does not wait.
            loop = asyncio.get_running_loop()
            started = loop.time()
            second = await client.post(url, json={"content": "Second", "stream": False})
            assert second.status_code == 200, second.text
            assert loop.time() - started < 3.0, "the next turn waited for the lease left from before the crash"

            # Once recovered, the left-over lease is gone (other instances are not blocked either),
            # and turns take their lease in Redis again.
            async def recovered() -> bool:
                return await redis_state(a) == ("ok", "ok", 0.0)

            await wait_for(recovered, timeout=DEADLINE, what="the app to recover")
            assert await redis_get(redis_server.url, lease) is None
            a.provider.queue(ScriptedReply("Third reply.", gate=(gate := asyncio.Semaphore(0))))
            third = asyncio.create_task(client.post(url, json={"content": "Third", "stream": False}))
            await wait_for(lambda: len(a.provider.prompts) == 3, timeout=DEADLINE, what="the third turn to start")
            assert await redis_get(redis_server.url, lease) is not None
            gate.release()
            gate.release()
            assert (await third).status_code == 200
            assert await redis_get(redis_server.url, lease) is None
