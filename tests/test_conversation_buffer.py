"""The conversation buffer never loses a message (issue: "Conversation buffer in Redis that never
loses a message"), end to end on real uvicorn instances, a private redis-server and SQLite and
PostgreSQL, with the scripted provider recording every prompt:

1. fifty turns on one conversation, alternating between two instances, through a FLUSHALL and a
   Redis restart: the whole history is stored in order, and every prompt held exactly the last
   SHORT_TERM_MEMORY_SIZE messages ending with the new one;
2. the buffer is rebuilt from the database on any miss (FLUSHALL, expiry, restart, and in process
   across an app restart);
3. a warm buffer serves the history: no SELECT of message rows during a turn;
4. a streamed reply is in the buffer once, complete, and a reply cut short by a disconnect is there
   with the text the user saw;
5. a message sent while a reply streams waits for it (or gets 409 and stores nothing);
6. bad input leaves the buffer and the history as they were.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import select

from companion.cache import keys
from companion.config import Settings
from companion.conversations.buffer import stamp
from companion.llm.base import ChatMessage
from companion.llm.scripted import ScriptedProvider, ScriptedReply
from companion.services import Services
from companion.storage.models import ConversationSummary
from tests.conftest import make_settings
from tests.support.api import assert_error, chat, create_conversation, running_server
from tests.support.conversation import (
    DEADLINE,
    Pair,
    Transcript,
    buffered,
    chat_stream,
    message_reads,
    messages_url,
    next_event,
    open_stream,
    paged_history,
    pairs,
    prompt_summary,
    redis_buffer,
    redis_command,
    release,
    rest_of,
    turns_waiting,
)
from tests.support.instances import Instance, running_instances
from tests.support.live import iter_sse, wait_for
from tests.support.redis_proc import RedisProcess, running_redis
from tests.support.tcp_proxy import TcpProxy

WINDOW = 6  # SHORT_TERM_MEMORY_SIZE: small, so that the window slides many times
TEST_BUDGET = 60.0  # a hang fails the test instead of stalling the run


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisProcess]:
    async with running_redis(tmp_path / "redis") as server:
        yield server


def buffer_settings(database_url: str, tmp_path: Path, redis: RedisProcess | None, **overrides: Any) -> Settings:
    """Redis on (the private server; a short breaker reset so recovery is quick) or off."""
    values: dict[str, Any] = {"short_term_memory_size": WINDOW}
    if redis is not None:
        values.update(redis_enabled=True, redis_url=redis.url, redis_breaker_reset_seconds=0.2)
    values.update(overrides)
    return make_settings(database_url, tmp_path, **values)


@pytest.fixture(params=["redis", "in-process"])
def cache_mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def redis_or_none(cache_mode: str, request: pytest.FixtureRequest) -> RedisProcess | None:
    return request.getfixturevalue("redis_server") if cache_mode == "redis" else None


async def redis_ok(instance: Instance) -> bool:
    return (await instance.health())["checks"]["redis"]["status"] == "ok"


async def summaries(services: Services, conversation_id: str) -> list[ConversationSummary]:
    async with services.database.session() as session:
        rows = await session.execute(
            select(ConversationSummary)
            .where(ConversationSummary.conversation_id == uuid.UUID(conversation_id))
            .order_by(ConversationSummary.id)
        )
        return list(rows.scalars())


def last_prompt_after(provider: ScriptedProvider, count: int) -> list[ChatMessage]:
    """The one prompt the provider got since it had `count`."""
    assert len(provider.prompts) == count + 1, f"expected one new prompt, got {len(provider.prompts) - count}"
    return provider.prompts[-1]


# --- 1. the acceptance test ----------------------------------------------------------------------

TURNS = 50
FLUSH_AFTER = 15
RESTART_AFTER = 30
DOWN_FOR = 2  # turns served while Redis is stopped


def message(turn: int) -> str:
    return f"Message {turn}: what do you make of the number {turn}?"


async def test_fifty_turns_on_two_instances_through_flushall_and_redis_restart_lose_nothing(
    database_url: str, tmp_path: Path, redis_server: RedisProcess
):
    settings = buffer_settings(database_url, tmp_path, redis_server)
    async with (
        asyncio.timeout(TEST_BUDGET),
        running_instances(settings) as instances,
        AsyncExitStack() as stack,
    ):
        for instance in instances:
            await instance.wait_channel_connected()
        key = (await instances[0].services.users.create("alice")).api_key
        clients = [await stack.enter_async_context(instance.client(key)) for instance in instances]
        conversation_id = (await create_conversation(clients[0]))["id"]
        buffer_key = keys.conversation_buffer(uuid.UUID(conversation_id))

        transcript = Transcript(WINDOW)
        # instance, prompt, done payload, the window the client expects that prompt to hold
        served: list[tuple[int, list[ChatMessage], dict[str, Any], list[Pair]]] = []
        sent: list[str] = []
        for turn in range(1, TURNS + 1):
            if turn == FLUSH_AFTER + 1:
                assert await redis_buffer(redis_server.url, conversation_id), "the buffer was never in Redis"
                assert await redis_command(redis_server.url, "FLUSHALL") in (True, b"OK", "OK")
                assert await redis_command(redis_server.url, "EXISTS", buffer_key) == 0
            if turn == RESTART_AFTER + 1:
                await redis_server.stop()
            if turn == RESTART_AFTER + DOWN_FOR + 1:
                await redis_server.start()  # empty, on the same port; the instances find it by themselves
            if turn == 41:
                for instance in instances:
                    await wait_for(partial(redis_ok, instance), timeout=DEADLINE, what="Redis to be ok again")
            which = turn % 2
            provider = instances[which].provider
            before = len(provider.prompts)
            content = message(turn)
            done, window = await transcript.chat(clients[which], conversation_id, content)  # 200 even with Redis down
            assert done["content"] == f"You said: {content}"
            served.append((which, last_prompt_after(provider, before), done, window))
            sent.append(content)

        assert sum(len(instance.provider.prompts) for instance in instances) == TURNS
        assert all(len(instance.provider.prompts) == TURNS // 2 for instance in instances), "not alternated"

        # Every message is stored, once, in order, complete.
        history = await paged_history(clients[1], conversation_id)
        assert len(history) == 2 * TURNS
        assert pairs(history) == [
            pair for content in sent for pair in (("user", content), ("assistant", f"You said: {content}"))
        ]
        assert {m["status"] for m in history} == {"complete"}
        for index, (_, _, done, _) in enumerate(served):
            assert (history[2 * index]["id"], history[2 * index + 1]["id"]) == (
                done["user_message_id"],
                done["message_id"],
            )

        # Every prompt held exactly the right recent messages, whichever instance served it and
        # whatever had just happened to Redis; and the running summary, if any, only ever covers
        # messages that had left that window.
        rows = await summaries(instances[0].services, conversation_id)
        assert rows, "no summary was written: the system-message check below would prove nothing"
        base = served[0][1][0].content
        assert base.startswith("You are Elara") and "Summary" not in base
        with_summary = 0
        for turn, (which, prompt, _, window) in enumerate(served, start=1):
            assert pairs(prompt[1:]) == window, f"turn {turn} on instance {which} had the wrong recent messages"
            assert prompt[0].role == "system" and prompt[0].content == base
            summary = prompt_summary(prompt)
            if summary is None:
                continue
            with_summary += 1
            first_in_window = next(m["id"] for m in history if (m["role"], m["content"]) == window[0])
            assert any(row.content == summary and row.upto_message_id < first_in_window for row in rows), (
                f"turn {turn}: the summary in the prompt is not one written for messages before the window"
            )
        assert with_summary, "no prompt carried the running summary"
        # Written out for two turns: with SHORT_TERM_MEMORY_SIZE=6, turn 2's prompt holds all three
        # messages so far, and turn 50's holds turn 47's reply, turns 48 and 49, and turn 50.
        assert pairs(served[1][1][1:]) == [
            ("user", message(1)),
            ("assistant", f"You said: {message(1)}"),
            ("user", message(2)),
        ]
        assert pairs(served[-1][1][1:]) == [
            ("assistant", f"You said: {message(47)}"),
            ("user", message(48)),
            ("assistant", f"You said: {message(48)}"),
            ("user", message(49)),
            ("assistant", f"You said: {message(49)}"),
            ("user", message(50)),
        ]

        # Redis is back, and the buffer in it is the conversation's newest messages, each once.
        assert [(m["id"], m["role"], m["content"]) for m in await redis_buffer(redis_server.url, conversation_id)] == [
            (m["id"], m["role"], m["content"]) for m in history[-WINDOW:]
        ]
        assert await redis_command(redis_server.url, "PTTL", buffer_key) > 0


# --- 2. the buffer is rebuilt from the database on any miss --------------------------------------


async def warm_up(client: httpx.AsyncClient, conversation_id: str, turns: int, transcript: Transcript) -> None:
    for turn in range(1, turns + 1):
        await transcript.chat(client, conversation_id, f"Early message {turn}.")


@pytest.mark.parametrize("miss", ["flushall", "key-deleted", "ttl-expired", "restart"])
async def test_after_a_redis_miss_the_buffer_is_rebuilt_from_the_database(
    database_url: str, tmp_path: Path, redis_server: RedisProcess, miss: str
):
    settings = buffer_settings(database_url, tmp_path, redis_server)
    async with asyncio.timeout(TEST_BUDGET), running_instances(settings, count=1) as (a,), AsyncExitStack() as stack:
        await a.wait_channel_connected()
        client = await stack.enter_async_context(a.client((await a.services.users.create("alice")).api_key))
        conversation_id = (await create_conversation(client))["id"]
        buffer_key = keys.conversation_buffer(uuid.UUID(conversation_id))
        transcript = Transcript(WINDOW)
        await warm_up(client, conversation_id, 4, transcript)
        assert len(await redis_buffer(redis_server.url, conversation_id)) == WINDOW

        if miss == "flushall":
            await redis_command(redis_server.url, "FLUSHALL")
        elif miss == "key-deleted":  # what expiry or eviction does
            assert await redis_command(redis_server.url, "DEL", buffer_key) == 1
        elif miss == "ttl-expired":
            # Redis's own expiry, made to happen now: the buffer keeps its normal TTL, so the one
            # rebuilt below cannot expire again before the test looks at it.
            assert 0 < await redis_command(redis_server.url, "PTTL", buffer_key) <= 3_600_000
            assert await redis_command(redis_server.url, "PEXPIRE", buffer_key, 1) == 1

            async def expired() -> bool:
                return await redis_command(redis_server.url, "EXISTS", buffer_key) == 0

            await wait_for(expired, timeout=DEADLINE, what="the buffer to expire")
        else:
            await redis_server.stop()
            await redis_server.start()  # empty; the next turn comes before the app has even noticed
        assert await redis_command(redis_server.url, "EXISTS", buffer_key) == 0

        before = len(a.provider.prompts)
        with message_reads(a.services) as reads:
            _, window = await transcript.chat(client, conversation_id, "What did I tell you before?")
        prompt = last_prompt_after(a.provider, before)
        history = await paged_history(client, conversation_id)
        assert window == [
            ("assistant", "You said: Early message 2."),
            ("user", "Early message 3."),
            ("assistant", "You said: Early message 3."),
            ("user", "Early message 4."),
            ("assistant", "You said: Early message 4."),
            ("user", "What did I tell you before?"),
        ]
        assert pairs(prompt[1:]) == window
        assert reads.by_turns, "the history did not come from the database: no miss was tested"

        if miss == "restart":
            await wait_for(lambda: redis_ok(a), timeout=DEADLINE, what="Redis to be ok again")
        assert [(m["id"], m["content"]) for m in await redis_buffer(redis_server.url, conversation_id)] == [
            (m["id"], m["content"]) for m in history[-WINDOW:]
        ], "the buffer was not rebuilt"
        # ... and the next turn is served from it.
        before = len(a.provider.prompts)
        with message_reads(a.services) as reads:
            _, window = await transcript.chat(client, conversation_id, "And now?")
        assert pairs(last_prompt_after(a.provider, before)[1:]) == window
        assert reads.by_turns == []


async def test_in_process_buffer_is_rebuilt_after_an_app_restart(database_url: str, tmp_path: Path):
    settings = buffer_settings(database_url, tmp_path, None)
    async with asyncio.timeout(TEST_BUDGET):
        async with running_server(settings, ScriptedProvider()) as server:
            key = (await server.app.state.services.users.create("alice")).api_key
            async with httpx.AsyncClient(
                base_url=server.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
            ) as client:
                conversation_id = (await create_conversation(client))["id"]
                transcript = Transcript(WINDOW)
                await warm_up(client, conversation_id, 4, transcript)
                assert len(await buffered(server.app.state.services, None, conversation_id)) == WINDOW

        provider = ScriptedProvider()
        async with running_server(settings, provider) as server:  # a new process, in effect: an empty buffer
            services: Services = server.app.state.services
            assert await buffered(services, None, conversation_id) == []
            async with httpx.AsyncClient(
                base_url=server.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
            ) as client:
                with message_reads(services) as reads:
                    _, window = await transcript.chat(client, conversation_id, "Do you remember me?")
                assert reads.by_turns, "the history did not come from the database"
                history = await paged_history(client, conversation_id)
                assert pairs(last_prompt_after(provider, 0)[1:]) == window
                assert window[:2] == [("assistant", "You said: Early message 2."), ("user", "Early message 3.")], (
                    "no earlier turns"
                )
                assert [(m["id"], m["content"]) for m in await buffered(services, None, conversation_id)] == [
                    (m["id"], m["content"]) for m in history[-WINDOW:]
                ]


# --- 2b. a buffer that missed messages is never extended ----------------------------------------
# Redis is a cache of the database, but one that can come back with old data (persistence) or stay
# reachable for some instances only (a partition). An instance that could not add its messages to the
# buffer cannot drop it either; another instance must not then extend that buffer as if it were whole.


@pytest.mark.parametrize("next_on", ["other-instance", "same-instance"])
async def test_a_turn_served_while_redis_was_down_is_in_the_next_prompt_when_redis_returns_with_old_data(
    database_url: str, tmp_path: Path, next_on: str
):
    async with asyncio.timeout(TEST_BUDGET), running_redis(tmp_path / "redis", persistent=True) as redis_server:
        settings = buffer_settings(database_url, tmp_path, redis_server)
        async with running_instances(settings) as (a, b), AsyncExitStack() as stack:
            for instance in (a, b):
                await instance.wait_channel_connected()
            key = (await a.services.users.create("alice")).api_key
            ca, cb = a.client(key), b.client(key)
            for client in (ca, cb):
                await stack.enter_async_context(client)
            conversation_id = (await create_conversation(ca))["id"]
            transcript = Transcript(WINDOW)
            await warm_up(cb, conversation_id, 3, transcript)
            stale = await redis_buffer(redis_server.url, conversation_id)
            assert len(stale) == WINDOW

            await redis_server.stop(kill=True)
            # Stored; the buffer could not follow.
            await transcript.chat(ca, conversation_id, "Said while Redis was down.")
            await redis_server.start()
            assert await redis_buffer(redis_server.url, conversation_id) == stale, "Redis lost its data"

            instance, client = (b, cb) if next_on == "other-instance" else (a, ca)
            before = len(instance.provider.prompts)
            _, window = await transcript.chat(client, conversation_id, "Do you remember what I said?")
            prompt = last_prompt_after(instance.provider, before)
            assert window == [
                ("assistant", "You said: Early message 2."),
                ("user", "Early message 3."),
                ("assistant", "You said: Early message 3."),
                ("user", "Said while Redis was down."),
                ("assistant", "You said: Said while Redis was down."),
                ("user", "Do you remember what I said?"),
            ]
            assert pairs(prompt[1:]) == window

            # Once both instances have recovered, the buffer is whole again and serves the next turns.
            for instance in (a, b):
                await wait_for(partial(redis_ok, instance), timeout=DEADLINE, what="Redis to be ok again")
            for instance, client in ((a, ca), (b, cb)):
                before = len(instance.provider.prompts)
                _, window = await transcript.chat(client, conversation_id, f"Still there, {instance.base_url}?")
                prompt = last_prompt_after(instance.provider, before)
                assert pairs(prompt[1:]) == window
            history = await paged_history(ca, conversation_id)
            assert [m["id"] for m in await redis_buffer(redis_server.url, conversation_id)] == [
                m["id"] for m in history[-WINDOW:]
            ]


async def test_a_turn_served_by_an_instance_cut_off_from_redis_is_in_the_next_prompt_on_another(
    database_url: str, tmp_path: Path, redis_server: RedisProcess
):
    """A partition: A reaches Redis through a proxy that is cut; B still reaches it directly."""
    proxy = TcpProxy(redis_server.port)
    await proxy.start()
    try:
        direct = buffer_settings(database_url, tmp_path, redis_server)
        behind_proxy = direct.model_copy(update={"redis_url": SecretStr(f"redis://127.0.0.1:{proxy.port}/0")})
        async with asyncio.timeout(TEST_BUDGET), AsyncExitStack() as stack:
            a = await stack.enter_async_context(running_server(behind_proxy, provider_a := ScriptedProvider()))
            b = await stack.enter_async_context(running_server(direct, provider_b := ScriptedProvider()))
            key = (await a.app.state.services.users.create("alice")).api_key
            headers = {"Authorization": f"Bearer {key}"}
            ca = await stack.enter_async_context(httpx.AsyncClient(base_url=a.base_url, headers=headers, timeout=30))
            cb = await stack.enter_async_context(httpx.AsyncClient(base_url=b.base_url, headers=headers, timeout=30))
            conversation_id = (await create_conversation(ca))["id"]
            transcript = Transcript(WINDOW)
            await warm_up(ca, conversation_id, 3, transcript)
            assert len(await redis_buffer(redis_server.url, conversation_id)) == WINDOW

            await proxy.stop()
            await transcript.chat(ca, conversation_id, "Said while A could not reach Redis.")
            assert len(provider_a.prompts) == 4

            _, window = await transcript.chat(cb, conversation_id, "Do you remember what I said?")
            prompt = last_prompt_after(provider_b, 0)
            assert window == [
                ("assistant", "You said: Early message 2."),
                ("user", "Early message 3."),
                ("assistant", "You said: Early message 3."),
                ("user", "Said while A could not reach Redis."),
                ("assistant", "You said: Said while A could not reach Redis."),
                ("user", "Do you remember what I said?"),
            ]
            assert pairs(prompt[1:]) == window
            await proxy.start()
    finally:
        await proxy.stop()


async def test_in_process_buffers_of_two_instances_sharing_a_database_never_miss_each_others_turns(
    database_url: str, tmp_path: Path
):
    """REDIS_ENABLED=false with several workers: each has its own buffer, which misses the turns the
    others served; it must be rebuilt, never extended past them."""
    settings = buffer_settings(database_url, tmp_path, None)
    async with asyncio.timeout(TEST_BUDGET), running_instances(settings) as instances, AsyncExitStack() as stack:
        key = (await instances[0].services.users.create("alice")).api_key
        clients = [await stack.enter_async_context(instance.client(key)) for instance in instances]
        conversation_id = (await create_conversation(clients[0]))["id"]
        transcript = Transcript(WINDOW)
        for turn in range(1, 11):
            which = 0 if turn % 3 else 1  # runs of two turns on one instance, so both buffers get warm
            before = len(instances[which].provider.prompts)
            _, window = await transcript.chat(clients[which], conversation_id, f"Message {turn}.")
            assert pairs(last_prompt_after(instances[which].provider, before)[1:]) == window, f"turn {turn}"
        assert pairs(await paged_history(clients[0], conversation_id)) == transcript.said
        # Turn 10 (on the first instance, whose buffer last saw turn 8): turns 8 and 9 in full.
        assert window == [
            ("assistant", "You said: Message 7."),
            ("user", "Message 8."),
            ("assistant", "You said: Message 8."),
            ("user", "Message 9."),
            ("assistant", "You said: Message 9."),
            ("user", "Message 10."),
        ]


# --- 3. a warm buffer serves the history ---------------------------------------------------------


async def test_a_warm_buffer_serves_the_history_without_selecting_messages(
    cache_mode: str, database_url: str, tmp_path: Path, redis_or_none: RedisProcess | None
):
    """Redis: two instances sharing the buffer, alternating; in process: one instance. The window
    slides during the measured turns (and the background summarizer, which does read messages, runs)."""
    settings = buffer_settings(database_url, tmp_path, redis_or_none)
    count = 2 if redis_or_none is not None else 1
    async with asyncio.timeout(TEST_BUDGET), running_instances(settings, count=count) as instances:
        async with AsyncExitStack() as stack:
            if redis_or_none is not None:
                for instance in instances:
                    await instance.wait_channel_connected()
            key = (await instances[0].services.users.create("alice")).api_key
            clients = [await stack.enter_async_context(instance.client(key)) for instance in instances]
            conversation_id = (await create_conversation(clients[0]))["id"]
            services = [instance.services for instance in instances]

            transcript = Transcript(WINDOW)
            with message_reads(*services) as reads:
                await transcript.chat(clients[0], conversation_id, "The first message.")
            assert reads.by_turns, "the first turn found a buffer: nothing would be proved"

            turns: list[tuple[int, int, list[Pair]]] = []  # instance, its prompt's index, the expected window
            with message_reads(*services) as reads:
                for turn in range(2, 10):
                    which = turn % count
                    provider = instances[which].provider
                    before = len(provider.prompts)
                    content = f"Warm message {turn}."
                    if turn % 3 == 0:  # streamed turns too: their progress is saved while they stream
                        window = transcript.send(content)
                        events = await chat_stream(clients[which], conversation_id, content)
                        assert events[-1].event == "done"
                        transcript.receive("".join(e.json()["text"] for e in events if e.event == "token"))
                    else:
                        _, window = await transcript.chat(clients[which], conversation_id, content)
                    last_prompt_after(provider, before)
                    turns.append((which, before, window))
                for instance in instances:
                    await instance.services.summarizer.wait_idle()
            assert reads.by_turns == [], "a warm turn read messages from the database"
            assert reads.by_summarizer, "the summarizer never ran: the window did not slide"

            for which, index, window in turns:
                assert pairs(instances[which].provider.prompts[index][1:]) == window
            assert pairs(await paged_history(clients[0], conversation_id)) == transcript.said


# --- 4. streamed replies in the buffer -----------------------------------------------------------


def without_stamp(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k != "at"}


def ids_once(entries: list[dict[str, Any]]) -> list[int]:
    ids = [m["id"] for m in entries]
    assert len(ids) == len(set(ids)), f"a message is in the buffer twice: {ids}"
    assert ids == sorted(ids), f"the buffer is out of order: {ids}"
    return ids


async def stored_reply(client: httpx.AsyncClient, conversation_id: str) -> dict[str, Any] | None:
    history = await paged_history(client, conversation_id)
    return history[-1] if history and history[-1]["role"] == "assistant" else None


async def test_a_streamed_reply_is_in_the_buffer_once_with_its_full_text(
    cache_mode: str, database_url: str, tmp_path: Path, redis_or_none: RedisProcess | None
):
    # Progress is saved every 10 ms while the reply streams: those saves must never reach the buffer.
    settings = buffer_settings(database_url, tmp_path, redis_or_none, stream_flush_interval_seconds=0.01)
    redis_url = redis_or_none.url if redis_or_none is not None else None
    async with asyncio.timeout(TEST_BUDGET), running_instances(settings, count=1) as (a,), AsyncExitStack() as stack:
        client = await stack.enter_async_context(a.client((await a.services.users.create("alice")).api_key))
        conversation_id = (await create_conversation(client))["id"]
        await warm_up(client, conversation_id, 2, Transcript(WINDOW))

        gate = asyncio.Semaphore(0)
        words = ["Streams ", "arrive ", "word ", "by ", "word."]
        a.provider.queue(ScriptedReply("".join(words), gate=gate))
        task = open_stream(client, conversation_id, "Tell me slowly")
        gate.release()
        async with asyncio.timeout(DEADLINE):
            response = await task
        try:
            events = iter_sse(response)
            user_message_id = (await next_event(events)).json()["user_message_id"]
            received = [(await next_event(events)).json()["text"]]
            for _ in range(2):
                gate.release()
                received.append((await next_event(events)).json()["text"])

            async def saved_while_streaming() -> bool:
                reply = await stored_reply(client, conversation_id)
                return reply is not None and (reply["content"], reply["status"]) == ("".join(received), "streaming")

            await wait_for(saved_while_streaming, timeout=DEADLINE, what="the progress to be saved")
            # The buffer has the question, and no copy of the reply yet, however much of it is saved.
            entries = await buffered(a.services, redis_url, conversation_id)
            assert ids_once(entries)[-1] == user_message_id
            assert without_stamp(entries[-1]) == {"id": user_message_id, "role": "user", "content": "Tell me slowly"}

            release(gate, len(words))
            rest = await rest_of(events)
        finally:
            await response.aclose()
        done = rest[-1].json()
        assert rest[-1].event == "done" and done["content"] == "".join(words)

        history = await paged_history(client, conversation_id)
        assert (history[-1]["id"], history[-1]["content"], history[-1]["status"]) == (
            done["message_id"],
            "".join(words),
            "complete",
        )
        entries = await buffered(a.services, redis_url, conversation_id)
        assert ids_once(entries) == [m["id"] for m in history[-WINDOW:]]
        assert without_stamp(entries[-1]) == {"id": done["message_id"], "role": "assistant", "content": "".join(words)}
        # Each entry carries its message's stamp: when it was stored (also the conversation's updated_at).
        assert [m["at"] for m in entries] == [stamp(datetime.fromisoformat(m["created_at"])) for m in history[-WINDOW:]]
        assert [(m["role"], m["content"]) for m in entries] == pairs(history[-WINDOW:])


async def test_a_reply_cut_short_by_a_stop_is_in_the_buffer_with_its_partial_text(
    cache_mode: str, database_url: str, tmp_path: Path, redis_or_none: RedisProcess | None
):
    settings = buffer_settings(database_url, tmp_path, redis_or_none)
    redis_url = redis_or_none.url if redis_or_none is not None else None
    count = 2 if redis_or_none is not None else 1  # with Redis, the next turn goes to another instance
    async with asyncio.timeout(TEST_BUDGET), running_instances(settings, count=count) as instances:
        async with AsyncExitStack() as stack:
            key = (await instances[0].services.users.create("alice")).api_key
            clients = [await stack.enter_async_context(instance.client(key)) for instance in instances]
            conversation_id = (await create_conversation(clients[0]))["id"]
            transcript = Transcript(WINDOW)
            await warm_up(clients[0], conversation_id, 2, transcript)  # 7 messages by the last turn: the window slides
            instances[0].provider.queue(ScriptedReply("Once upon a time there was", hang_after=3))
            transcript.send("Tell me a story")

            async with asyncio.timeout(DEADLINE):
                response = await open_stream(clients[0], conversation_id, "Tell me a story")
            try:
                events = iter_sse(response)
                first = await next_event(events)
                assert first.event == "message"
                seen = [(await next_event(events)).json()["text"] for _ in range(3)]
                assert seen == ["Once ", "upon ", "a "]
                transcript.receive("".join(seen))
                # The model hangs: stop the reply (through the other instance, when there are two).
                message_id = first.json()["message_id"]
                stopped = await clients[-1].post(f"/v1/conversations/{conversation_id}/messages/{message_id}/stop")
                assert stopped.status_code == 200, stopped.text
            finally:
                await response.aclose()

            async def settled() -> bool:
                reply = await stored_reply(clients[0], conversation_id)
                return reply is not None and reply["status"] == "stopped"

            await wait_for(settled, timeout=DEADLINE, what="the partial reply to be marked stopped")
            reply = await stored_reply(clients[0], conversation_id)
            assert reply is not None and reply["content"] == "Once upon a "
            entries = await buffered(instances[0].services, redis_url, conversation_id)
            ids_once(entries)
            assert without_stamp(entries[-1]) == {"id": reply["id"], "role": "assistant", "content": "Once upon a "}

            provider = instances[-1].provider
            before = len(provider.prompts)
            _, window = await transcript.chat(clients[-1], conversation_id, "Go on")
            prompt = last_prompt_after(provider, before)
            history = await paged_history(clients[0], conversation_id)
            assert window == [
                ("assistant", "You said: Early message 1."),
                ("user", "Early message 2."),
                ("assistant", "You said: Early message 2."),
                ("user", "Tell me a story"),
                ("assistant", "Once upon a "),
                ("user", "Go on"),
            ]
            assert pairs(prompt[1:]) == window
            assert [m["status"] for m in history] == [
                "complete",
                "complete",
                "complete",
                "complete",
                "complete",
                "stopped",
                "complete",
                "complete",
            ]


# --- 5. one turn at a time -----------------------------------------------------------------------


@pytest.fixture(params=["redis-two-instances", "in-process"])
def turn_mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def turn_redis(turn_mode: str, request: pytest.FixtureRequest) -> RedisProcess | None:
    return request.getfixturevalue("redis_server") if turn_mode.startswith("redis") else None


async def test_a_message_sent_while_a_reply_streams_waits_for_it_and_sees_it(
    turn_mode: str, database_url: str, tmp_path: Path, turn_redis: RedisProcess | None
):
    settings = buffer_settings(database_url, tmp_path, turn_redis)
    count = 2 if turn_mode == "redis-two-instances" else 1
    async with asyncio.timeout(TEST_BUDGET), running_instances(settings, count=count) as instances:
        async with AsyncExitStack() as stack:
            first, second = instances[0], instances[-1]
            key = (await first.services.users.create("alice")).api_key
            clients = [await stack.enter_async_context(instance.client(key)) for instance in instances]
            conversation_id = (await create_conversation(clients[0]))["id"]

            gate = asyncio.Semaphore(0)
            first.provider.queue(ScriptedReply("The first reply takes its time.", gate=gate))
            task = open_stream(clients[0], conversation_id, "First question")
            gate.release()
            async with asyncio.timeout(DEADLINE):
                response = await task
            try:
                events = iter_sse(response)
                assert (await next_event(events)).event == "message"
                assert (await next_event(events)).json() == {"text": "The "}

                follow_up = asyncio.create_task(chat(clients[-1], conversation_id, "Second question"))
                # Queued behind the streaming turn (on the second instance: waiting for the lease).
                queued = 2 if count == 1 else 1
                await wait_for(
                    lambda: turns_waiting(second.services, conversation_id) == queued,
                    timeout=DEADLINE,
                    what="the second message to wait for its turn",
                )
                assert len(second.provider.prompts) == (1 if count == 1 else 0), "the second turn did not wait"
                assert [m["content"] for m in await paged_history(clients[0], conversation_id)] == [
                    "First question",
                    "The ",
                ]
                release(gate, 10)
                rest = await rest_of(events)
            finally:
                await response.aclose()
            assert rest[-1].event == "done" and rest[-1].json()["content"] == "The first reply takes its time."
            async with asyncio.timeout(DEADLINE):
                done = await follow_up

            prompt = second.provider.prompts[-1]
            assert pairs(prompt[1:]) == [
                ("user", "First question"),
                ("assistant", "The first reply takes its time."),
                ("user", "Second question"),
            ]
            history = await paged_history(clients[0], conversation_id)
            assert [(m["role"], m["content"], m["status"]) for m in history] == [
                ("user", "First question", "complete"),
                ("assistant", "The first reply takes its time.", "complete"),
                ("user", "Second question", "complete"),
                ("assistant", "You said: Second question", "complete"),
            ]
            assert done["user_message_id"] == history[2]["id"] > rest[-1].json()["message_id"]
            entries = await buffered(
                second.services, turn_redis.url if turn_redis is not None else None, conversation_id
            )
            assert ids_once(entries) == [m["id"] for m in history]


async def test_a_message_that_waits_too_long_gets_409_and_nothing_is_stored(
    turn_mode: str, database_url: str, tmp_path: Path, turn_redis: RedisProcess | None
):
    settings = buffer_settings(database_url, tmp_path, turn_redis, turn_wait_seconds=0.3)
    redis_url = turn_redis.url if turn_redis is not None else None
    count = 2 if turn_mode == "redis-two-instances" else 1
    async with asyncio.timeout(TEST_BUDGET), running_instances(settings, count=count) as instances:
        async with AsyncExitStack() as stack:
            first, second = instances[0], instances[-1]
            key = (await first.services.users.create("alice")).api_key
            clients = [await stack.enter_async_context(instance.client(key)) for instance in instances]
            conversation_id = (await create_conversation(clients[0]))["id"]
            transcript = Transcript(WINDOW)
            await warm_up(clients[0], conversation_id, 2, transcript)  # 7 messages by the last turn: the window slides

            gate = asyncio.Semaphore(0)
            first.provider.queue(ScriptedReply("A slow and steady reply.", gate=gate))
            transcript.send("Take your time")
            task = open_stream(clients[0], conversation_id, "Take your time")
            gate.release()
            async with asyncio.timeout(DEADLINE):
                response = await task
            try:
                events = iter_sse(response)
                assert (await next_event(events)).event == "message"
                assert (await next_event(events)).json() == {"text": "A "}
                history = await paged_history(clients[0], conversation_id)
                entries = await buffered(first.services, redis_url, conversation_id)
                prompts = len(second.provider.prompts)

                for stream in (False, True):
                    busy = await clients[-1].post(
                        messages_url(conversation_id), json={"content": "Are you done yet?", "stream": stream}
                    )
                    assert_error(busy, 409, "conversation_busy")
                    assert await paged_history(clients[0], conversation_id) == history, "something was stored"
                    assert await buffered(first.services, redis_url, conversation_id) == entries
                    assert len(second.provider.prompts) == prompts, "the model was called"

                release(gate, 10)
                rest = await rest_of(events)
            finally:
                await response.aclose()
            assert [e.event for e in rest][-1] == "done"
            assert rest[-1].json()["content"] == "A slow and steady reply."
            transcript.receive("A " + "".join(e.json()["text"] for e in rest if e.event == "token"))

            history = await paged_history(clients[0], conversation_id)
            assert [(m["content"], m["status"]) for m in history] == [
                ("Early message 1.", "complete"),
                ("You said: Early message 1.", "complete"),
                ("Early message 2.", "complete"),
                ("You said: Early message 2.", "complete"),
                ("Take your time", "complete"),
                ("A slow and steady reply.", "complete"),
            ]
            # The conversation is free again, and the next turn sees the whole exchange (and none of
            # the refused messages).
            _, window = await transcript.chat(clients[-1], conversation_id, "Now then")
            assert window == [
                ("assistant", "You said: Early message 1."),
                ("user", "Early message 2."),
                ("assistant", "You said: Early message 2."),
                ("user", "Take your time"),
                ("assistant", "A slow and steady reply."),
                ("user", "Now then"),
            ]
            assert pairs(second.provider.prompts[-1][1:]) == window


# --- 6. bad input leaves the buffer alone --------------------------------------------------------

MAX_CHARS = 50
# Each body with the answer it must get: the status and the error code, in the one error shape.
# (Bytes that are not UTF-8 are refused by the framework's body parser, before validation: a 400.)
BAD_BODIES: list[tuple[str, bytes, int, str]] = [
    ("empty", b'{"content": ""}', 422, "invalid_input"),
    ("whitespace-only", b'{"content": " \\t\\n\\r "}', 422, "invalid_input"),
    ("over-max-chars", b'{"content": "' + b"x" * (MAX_CHARS + 1) + b'"}', 422, "message_too_long"),
    ("nul", b'{"content": "a\\u0000b"}', 422, "invalid_input"),
    ("escape-sequence", b'{"content": "\\u001b[2Jcleared"}', 422, "invalid_input"),
    ("c1-control", b'{"content": "a\\u0085b"}', 422, "invalid_input"),
    ("lone-surrogate-escape", b'{"content": "\\ud800"}', 422, "invalid_input"),
    ("lone-low-surrogate-escape", b'{"content": "a\\udc00b"}', 422, "invalid_input"),
    ("surrogate-encoded-as-utf8", b'{"content": "\xed\xa0\x80"}', 422, "invalid_input"),
    ("invalid-utf8-latin1", b'{"content": "caf\xe9"}', 400, "http_error"),
    ("invalid-utf8-bytes", b'{"content": "\xff\xfe\xfd"}', 400, "http_error"),
    ("truncated-utf8", b'{"content": "\xe2\x82"}', 400, "http_error"),
]


async def test_bad_input_leaves_the_buffer_and_the_history_unchanged(
    cache_mode: str, database_url: str, tmp_path: Path, redis_or_none: RedisProcess | None, subtests: pytest.Subtests
):
    settings = buffer_settings(database_url, tmp_path, redis_or_none, max_message_chars=MAX_CHARS)
    redis_url = redis_or_none.url if redis_or_none is not None else None
    async with asyncio.timeout(TEST_BUDGET), running_instances(settings, count=1) as (a,), AsyncExitStack() as stack:
        client = await stack.enter_async_context(a.client((await a.services.users.create("alice")).api_key))
        conversation_id = (await create_conversation(client))["id"]
        transcript = Transcript(WINDOW)
        await warm_up(client, conversation_id, 3, transcript)  # 7 messages by the last turn: the window slides
        history = await paged_history(client, conversation_id)
        entries = await buffered(a.services, redis_url, conversation_id)
        assert ids_once(entries) == [m["id"] for m in history]
        prompts = len(a.provider.prompts)

        for case, body, status, code in BAD_BODIES:
            for stream in (b"true", b"false"):
                with subtests.test(case=case, stream=stream.decode()):
                    raw = body[:-1] + b', "stream": ' + stream + b"}"
                    response = await client.post(
                        messages_url(conversation_id), content=raw, headers={"Content-Type": "application/json"}
                    )
                    assert_error(response, status, code)
                    assert await buffered(a.services, redis_url, conversation_id) == entries
                    assert await paged_history(client, conversation_id) == history
                    assert len(a.provider.prompts) == prompts, "the model was called"

        # The buffer still works: the next good turn sees exactly the history.
        _, window = await transcript.chat(client, conversation_id, "A good message at last.")
        history = await paged_history(client, conversation_id)
        assert window == [
            ("assistant", "You said: Early message 1."),
            ("user", "Early message 2."),
            ("assistant", "You said: Early message 2."),
            ("user", "Early message 3."),
            ("assistant", "You said: Early message 3."),
            ("user", "A good message at last."),
        ]
        assert pairs(last_prompt_after(a.provider, prompts)[1:]) == window
        assert ids_once(await buffered(a.services, redis_url, conversation_id)) == [m["id"] for m in history[-WINDOW:]]
