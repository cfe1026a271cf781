"""Admission control over real HTTP: a worker runs at most ADMISSION_MAX_TURNS chat turns at once
with ADMISSION_TURN_QUEUE waiting; the next turn gets 503 `overloaded` with Retry-After, in the one
error shape, and nothing is stored for it. Other requests have their own gate; health checks and
metrics never wait. The scripted model holds each reply at its first token until the test lets it go,
so the number of turns in flight is exact, not a matter of timing."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import pytest

from companion.config import Settings
from companion.llm.scripted import ScriptedProvider, ScriptedReply
from companion.services import Services
from tests.conftest import make_settings
from tests.support.api import all_messages, assert_error, create_conversation
from tests.support.live import LiveServer, iter_sse, wait_for

pytestmark = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
DEADLINE = 10.0


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return make_settings(
        database_url,
        tmp_path,
        admission_max_turns=2,
        admission_turn_queue=1,
        admission_max_requests=4,
        admission_request_queue=0,
        admission_queue_timeout_seconds=60,
    )


def turn(client: httpx.AsyncClient, conversation_id: str, content: str = "Hello there") -> asyncio.Task[httpx.Response]:
    return asyncio.create_task(
        client.post(f"/v1/conversations/{conversation_id}/messages", json={"content": content, "stream": False})
    )


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if labels else "") + r" ([0-9.e+-]+)"
    found = re.search(pattern, text)
    assert found is not None, f"{name} {labels} not in /metrics"
    return float(found.group(1))


async def test_turns_past_the_limit_and_the_queue_are_refused_with_overloaded_and_store_nothing(
    client: httpx.AsyncClient, app_services: Services, provider: ScriptedProvider
) -> None:
    release = asyncio.Semaphore(0)
    for _ in range(3):
        provider.queue(ScriptedReply("held reply", gate=release))
    conversations = [(await create_conversation(client))["id"] for _ in range(4)]
    gate = app_services.admission.turns  # type: ignore[union-attr]
    running = [turn(client, conversations[0]), turn(client, conversations[1])]
    await wait_for(lambda: len(provider.prompts) == 2, what="two turns at the model")
    queued = turn(client, conversations[2])
    await wait_for(lambda: gate.waiting == 1, what="a turn in the queue")
    assert gate.in_flight == 2

    refused = await client.post(f"/v1/conversations/{conversations[3]}/messages", json={"content": "Me too"})
    assert_error(refused, 503, "overloaded")
    assert int(refused.headers["retry-after"]) >= 1
    assert await all_messages(client, conversations[3]) == []  # refused before anything was stored
    assert len(provider.prompts) == 2  # and it cost no model time
    assert (await client.get("/health")).status_code == 200  # monitors get through a busy worker

    for _ in range(20):
        release.release()
    async with asyncio.timeout(DEADLINE):
        answers = await asyncio.gather(*running, queued)
    assert [answer.status_code for answer in answers] == [200, 200, 200]
    await wait_for(lambda: gate.in_flight == 0, what="every slot to be released")

    text = (await client.get("/metrics")).text
    assert metric(text, "companion_admission_admitted_total", gate="turn") == 3
    assert metric(text, "companion_admission_queued_total", gate="turn") == 1
    assert metric(text, "companion_admission_shed_total", gate="turn", reason="queue_full") == 1
    assert metric(text, "companion_admission_queue_wait_seconds_count", gate="turn") == 1
    assert metric(text, "companion_admission_queue_wait_seconds_sum", gate="turn") > 0


async def test_other_requests_have_their_own_gate_and_health_and_metrics_are_never_gated(
    client: httpx.AsyncClient, app_services: Services
) -> None:
    conversation = (await create_conversation(client))["id"]
    gate = app_services.admission.requests  # type: ignore[union-attr]
    held = [await gate.acquire() for _ in range(gate.limit)]  # every slot busy, no queue
    try:
        assert_error(await client.get("/v1/conversations"), 503, "overloaded")
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200
        answer = await client.post(
            f"/v1/conversations/{conversation}/messages", json={"content": "Hi", "stream": False}
        )
        assert answer.status_code == 200, answer.text  # a turn takes a turn slot, not one of these
    finally:
        for permit in held:
            permit.release()
    assert (await client.get("/v1/conversations")).status_code == 200
    assert gate.in_flight == 0 and app_services.admission.turns.in_flight == 0  # type: ignore[union-attr]


async def test_a_turn_refused_after_admission_gives_its_slot_back(
    client: httpx.AsyncClient, app_services: Services
) -> None:
    gate = app_services.admission.turns  # type: ignore[union-attr]
    missing = "00000000-0000-4000-8000-000000000000"
    assert_error(await client.post(f"/v1/conversations/{missing}/messages", json={"content": "Hi"}), 404)
    conversation = (await create_conversation(client))["id"]
    assert_error(await client.post(f"/v1/conversations/{conversation}/messages", json={"content": " "}), 422)
    assert gate.in_flight == 0 and gate.stats.admitted == 2


async def test_a_turn_whose_client_leaves_holds_its_slot_until_the_reply_is_settled(
    client: httpx.AsyncClient, app_services: Services, provider: ScriptedProvider
) -> None:
    release = asyncio.Semaphore(1)  # the first token goes out, the next ones wait
    provider.queue(ScriptedReply("first second third", gate=release))
    conversation = (await create_conversation(client))["id"]
    gate = app_services.admission.turns  # type: ignore[union-attr]
    async with asyncio.timeout(DEADLINE):
        async with client.stream(
            "POST", f"/v1/conversations/{conversation}/messages", json={"content": "Tell me"}
        ) as response:
            assert response.status_code == 200
            message_id = 0
            async for event in iter_sse(response):
                if event.event == "message":
                    message_id = event.json()["message_id"]
                if event.event == "token":
                    break
            assert gate.in_flight == 1
    # The client has gone; the reply goes on (it runs apart from its request) and keeps the slot ...
    assert app_services.runs.running(message_id)
    assert gate.in_flight == 1
    for _ in range(2):
        release.release()  # ... until the model has finished it
    await wait_for(lambda: gate.in_flight == 0, what="the slot to be released")

    async def settled() -> bool:
        messages = await all_messages(client, conversation)
        return len(messages) == 2 and messages[1]["status"] == "complete"

    await wait_for(settled, what="the reply to be finished without its client")
    await wait_for(lambda: gate.in_flight == 0, what="the slot to be released")


async def test_following_a_resumed_reply_holds_no_slot(
    client: httpx.AsyncClient, app_services: Services, provider: ScriptedProvider
) -> None:
    release = asyncio.Semaphore(1)
    provider.queue(ScriptedReply("first second third", gate=release))
    conversation = (await create_conversation(client))["id"]
    admission = app_services.admission
    assert admission is not None
    async with asyncio.timeout(DEADLINE):
        async with client.stream(
            "POST", f"/v1/conversations/{conversation}/messages", json={"content": "Tell me"}
        ) as response:
            first = await anext(iter_sse(response))
            message_id = first.json()["message_id"]
        url = f"/v1/conversations/{conversation}/messages/{message_id}/stream"
        async with client.stream("GET", url) as resumed:
            assert resumed.status_code == 200
            events = iter_sse(resumed)
            await anext(events)
            assert admission.requests.in_flight == 0  # following is waiting, not work
            assert admission.turns.in_flight == 1  # the reply itself still holds its turn slot
            for _ in range(10):
                release.release()
            rest = [event.event async for event in events]
    assert rest[-1] == "done"
    await wait_for(lambda: admission.turns.in_flight == 0, what="the turn slot to be released")


async def test_the_chat_completions_route_is_a_turn(server: LiveServer, api_key: str, app_services: Services) -> None:
    gate = app_services.admission.turns  # type: ignore[union-attr]
    held = [await gate.acquire() for _ in range(gate.limit)]
    waiter = asyncio.create_task(gate.acquire())  # and the queue full
    await wait_for(lambda: gate.waiting == gate.queue, what="a full queue")
    try:
        async with httpx.AsyncClient(base_url=server.base_url, headers={"Authorization": f"Bearer {api_key}"}) as http:
            body = {"model": "elara", "messages": [{"role": "user", "content": "Hi"}]}
            refused = await http.post("/v1/chat/completions", json=body)
            assert_error(refused, 503, "overloaded")
            assert (await http.get("/v1/conversations")).json()["data"] == []  # no conversation created
    finally:
        for permit in held:
            permit.release()
        (await waiter).release()
    assert gate.in_flight == 0
