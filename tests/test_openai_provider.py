"""OpenAICompatibleProvider against a real OpenAI-compatible server, namely our own service running
the scripted provider on a second uvicorn server; and the app under test configured with that
provider, end to end. Failures are real too: a refused port, and a TCP server that never answers."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI

from companion.app import create_app
from companion.config import Settings
from companion.errors import ProviderError, ProviderTimeout
from companion.llm.base import ChatMessage, Chunk, GenerationParams, Usage
from companion.llm.openai_compat import OpenAICompatibleProvider
from companion.llm.scripted import ScriptedProvider, ScriptedReply
from tests.support.live import LiveServer, iter_sse, wait_for

PARAMS = GenerationParams(max_tokens=64, temperature=0.3)
PROMPT = [ChatMessage("system", "You are terse."), ChatMessage("user", "Hi upstream")]
ERROR_FIELDS = {"message", "type", "code", "param"}


@asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[LiveServer]:
    live = LiveServer(app)
    await live.start()
    try:
        yield live
    finally:
        await live.stop()


@dataclass
class Upstream:
    """Our own service as the OpenAI-compatible LLM server, with a user to call it as."""

    server: LiveServer
    provider: ScriptedProvider
    api_key: str

    @property
    def base_url(self) -> str:
        return self.server.base_url + "/v1"

    async def messages(self) -> list[dict[str, Any]]:
        """Everything the upstream stored for its user, oldest first."""
        headers = {"Authorization": f"Bearer {self.api_key}"}
        async with httpx.AsyncClient(base_url=self.server.base_url, headers=headers, timeout=30) as http:
            conversations = (await http.get("/v1/conversations")).json()["data"]
            found: list[dict[str, Any]] = []
            for conversation in conversations:
                response = await http.get(f"/v1/conversations/{conversation['id']}/messages", params={"limit": 200})
                found.extend(response.json()["data"])
        return found


@pytest.fixture
async def upstream(settings: Settings) -> AsyncIterator[Upstream]:
    """A second live server (same database settings: two instances of the service, as with several
    workers) whose LLM is a ScriptedProvider."""
    scripted = ScriptedProvider()
    async with serve(create_app(settings, provider=scripted)) as live:
        key = (await live.app.state.services.users.create("upstream")).api_key
        yield Upstream(live, scripted, key)


@asynccontextmanager
async def openai_provider(base_url: str, **kwargs: Any) -> AsyncIterator[OpenAICompatibleProvider]:
    options: dict[str, Any] = {"model": "elara", "api_key": "unused", "timeout_seconds": 10.0, "max_retries": 0}
    options.update(kwargs)
    provider = OpenAICompatibleProvider(base_url=base_url, **options)
    try:
        await provider.start()
        yield provider
    finally:
        await provider.aclose()


async def collect(
    provider: OpenAICompatibleProvider,
    messages: Sequence[ChatMessage] = PROMPT,
    params: GenerationParams = PARAMS,
    into: list[Chunk] | None = None,
) -> list[Chunk]:
    chunks = into if into is not None else []
    async for chunk in provider.stream(messages, params):
        chunks.append(chunk)
    return chunks


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A loopback port that refuses connections: bound (so nobody else takes it) but not listening."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        sock.close()


class RawServer:
    """A loopback TCP server speaking just enough HTTP/1.1: it reads a request in full, then sends
    `reply` verbatim and hangs up; with `reply=None` it accepts, reads, and never answers."""

    def __init__(self, reply: bytes | None = None) -> None:
        self.reply = reply
        self.accepted = 0
        self.open = 0
        self._server: asyncio.Server | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/v1"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.open += 1
        try:
            if self.reply is None:
                await reader.read()  # until the client gives up and closes its end
                return
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                head = await reader.readuntil(b"\r\n\r\n")
                lengths = [line.split(b":", 1)[1] for line in head.split(b"\r\n") if b"content-length:" in line.lower()]
                await reader.readexactly(int(lengths[0]) if lengths else 0)
                writer.write(self.reply)
                await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            self.open -= 1

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await wait_for(lambda: self.open == 0, what="the connections to the raw server to end")
        await self._server.wait_closed()


@asynccontextmanager
async def raw_server(reply: bytes | None = None) -> AsyncIterator[RawServer]:
    server = RawServer(reply)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def silent() -> AsyncIterator[RawServer]:
    """A server that accepts connections and never answers."""
    async with raw_server() as server:
        yield server


def sse_reply(*events: bytes) -> bytes:
    """A complete HTTP response carrying these `data:` events verbatim (no [DONE])."""
    body = b"".join(b"data: " + event + b"\n\n" for event in events)
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n"
    return head + b"content-length: %d\r\n\r\n" % len(body) + body


GOOD_CHUNK = (
    b'{"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":{"content":"hi "},"finish_reason":null}]}'
)
MALFORMED = b"{not json"


def assert_error_body(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_FIELDS, body
    assert body["error"]["code"] == code, body
    error: dict[str, Any] = body["error"]
    return error


# --- the provider against a real OpenAI-compatible server ------------------------------------------


async def test_streams_chunks_and_usage_from_the_upstream(upstream: Upstream):
    # The upstream reports a prompt size of its own (no estimate could give it), so that the usage
    # below is seen to be the upstream's figure, passed through.
    upstream.provider.queue(ScriptedReply("Hello from upstream.", prompt_tokens=4321))
    async with openai_provider(upstream.base_url, api_key=upstream.api_key) as provider:
        chunks = await collect(provider)

    assert [c.text for c in chunks[:-1]] == ["Hello ", "from ", "upstream."]
    assert all(c.usage is None and c.finish_reason is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.text == ""
    assert last.finish_reason == "stop"
    # The usage is the upstream's own count, passed through (stream_options include_usage).
    upstream_prompt = upstream.provider.prompts[0]
    assert last.usage == Usage(4321, 3)
    # What the upstream received: our newest user message, max_tokens and temperature.
    assert upstream_prompt[-1] == ChatMessage("user", "Hi upstream")
    assert upstream.provider.params[0].max_tokens == PARAMS.max_tokens
    assert upstream.provider.params[0].temperature == PARAMS.temperature
    stored = [(m["role"], m["content"], m["status"]) for m in await upstream.messages()]
    assert stored == [("user", "Hi upstream", "complete"), ("assistant", "Hello from upstream.", "complete")]


async def test_finish_reason_length_comes_through(upstream: Upstream):
    upstream.provider.queue("one two three four five")
    async with openai_provider(upstream.base_url, api_key=upstream.api_key) as provider:
        chunks = await collect(provider, params=GenerationParams(max_tokens=2, temperature=0.0))
    assert "".join(c.text for c in chunks) == "one two "
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 2


async def test_chunks_arrive_as_the_upstream_generates_them(upstream: Upstream):
    gate = asyncio.Semaphore(0)
    upstream.provider.queue(ScriptedReply("slow and steady", gate=gate))
    gate.release()  # the upstream answers once its first token exists
    async with openai_provider(upstream.base_url, api_key=upstream.api_key) as provider:
        stream = provider.stream(PROMPT, PARAMS)
        try:
            assert (await asyncio.wait_for(anext(stream), 10)).text == "slow "
            for expected in ("and ", "steady"):
                gate.release()
                assert (await asyncio.wait_for(anext(stream), 10)).text == expected
            rest = [chunk async for chunk in stream]
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
    assert [(c.text, c.finish_reason) for c in rest] == [("", "stop")]


@pytest.mark.parametrize(
    ("options", "status"),
    [({"api_key": "wrong-key-secret"}, 401), ({"model": "no-such-model"}, 404)],
    ids=["unauthorized", "unknown-model"],
)
async def test_upstream_http_errors_become_provider_error(upstream: Upstream, options: dict[str, Any], status: int):
    upstream.provider.queue("never sent")
    settings: dict[str, Any] = {"api_key": upstream.api_key, **options}
    async with openai_provider(upstream.base_url, **settings) as provider:
        with pytest.raises(ProviderError) as caught:
            await collect(provider)
    error = caught.value
    assert type(error) is ProviderError
    assert error.status_code == 502 and error.code == "llm_provider_error"
    assert f"HTTP {status}" in error.message
    assert "wrong-key-secret" not in error.message and upstream.api_key not in error.message
    assert isinstance(error.__cause__, openai.APIStatusError) and error.__cause__.status_code == status
    assert upstream.provider.prompts == []


async def test_upstream_failing_before_its_first_token_becomes_provider_error(upstream: Upstream):
    upstream.provider.queue(ScriptedReply("a b c", fail_after=0))
    async with openai_provider(upstream.base_url, api_key=upstream.api_key) as provider:
        with pytest.raises(ProviderError) as caught:
            await collect(provider)
    assert type(caught.value) is ProviderError
    assert "HTTP 502" in caught.value.message
    assert len(upstream.provider.prompts) == 1, "max_retries=0: one attempt"


async def test_upstream_failing_mid_reply_becomes_provider_error_after_the_partial_text(upstream: Upstream):
    upstream.provider.queue(ScriptedReply("a b c", fail_after=2))
    chunks: list[Chunk] = []
    async with openai_provider(upstream.base_url, api_key=upstream.api_key) as provider:
        with pytest.raises(ProviderError) as caught:
            await collect(provider, into=chunks)
    assert [c.text for c in chunks] == ["a ", "b "]
    assert type(caught.value) is ProviderError
    assert caught.value.message == "The LLM server sent an error mid-reply."
    assert isinstance(caught.value.__cause__, openai.APIError)


async def test_connection_refused_becomes_provider_error(refused_url: str):
    async with openai_provider(refused_url) as provider:
        with pytest.raises(ProviderError) as caught:
            await collect(provider)
    assert type(caught.value) is ProviderError
    assert caught.value.status_code == 502
    assert "Cannot reach the LLM server" in caught.value.message
    assert isinstance(caught.value.__cause__, openai.APIConnectionError)


async def test_a_server_that_never_answers_becomes_provider_timeout(silent: RawServer):
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with openai_provider(silent.base_url, timeout_seconds=0.5) as provider:
        with pytest.raises(ProviderTimeout) as caught:
            await collect(provider)
    elapsed = loop.time() - started
    assert caught.value.status_code == 504 and caught.value.code == "llm_provider_timeout"
    assert isinstance(caught.value.__cause__, openai.APITimeoutError)
    assert silent.accepted == 1, "the request reached the server once (no retries)"
    assert 0.4 <= elapsed < 5, elapsed


async def test_a_malformed_reply_becomes_provider_error():
    """An upstream that breaks the streaming format (an event that is not JSON) is an upstream
    failure like any other: ProviderError after the text that did arrive, never a raw exception."""
    async with raw_server(sse_reply(GOOD_CHUNK, MALFORMED)) as server, openai_provider(server.base_url) as provider:
        chunks: list[Chunk] = []
        with pytest.raises(ProviderError) as caught:
            await collect(provider, into=chunks)
    assert [c.text for c in chunks] == ["hi "]
    assert type(caught.value) is ProviderError
    assert caught.value.message == "The LLM server sent a malformed reply."


async def test_an_upstream_that_stalls_mid_reply_becomes_provider_timeout(upstream: Upstream):
    upstream.provider.queue(ScriptedReply("a b c", hang_after=1))
    chunks: list[Chunk] = []
    # The timeout bounds each read, the first chunk's too: long enough for the upstream's first turn on
    # a busy machine (0.5 s was not, once, in CI), and the hang after "a " never ends anyway.
    async with openai_provider(upstream.base_url, api_key=upstream.api_key, timeout_seconds=3.0) as provider:
        with pytest.raises(ProviderTimeout):
            await collect(provider, into=chunks)
    assert [c.text for c in chunks] == ["a "]

    # We hung up: the upstream notices and keeps its partial reply as incomplete.
    async def upstream_settled() -> bool:
        return [(m["role"], m["status"]) for m in await upstream.messages()] == [
            ("user", "complete"),
            ("assistant", "incomplete"),
        ]

    await wait_for(upstream_settled, what="the upstream to mark its abandoned reply incomplete")


# --- end to end: the app under test, configured with the OpenAI-compatible provider ----------------


@asynccontextmanager
async def app_with(settings: Settings, provider: OpenAICompatibleProvider) -> AsyncIterator[httpx.AsyncClient]:
    """The app under test on uvicorn with `provider`, and a client authenticated as a new user."""
    async with serve(create_app(settings, provider=provider)) as live:
        key = (await live.app.state.services.users.create("alice")).api_key
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=live.base_url, headers=headers, timeout=30) as http:
            yield http


async def new_conversation(client: httpx.AsyncClient) -> str:
    response = await client.post("/v1/conversations", json={"personality": "elara"})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def stored(client: httpx.AsyncClient, conversation_id: str) -> list[tuple[str, str, str]]:
    response = await client.get(f"/v1/conversations/{conversation_id}/messages", params={"limit": 200})
    assert response.status_code == 200, response.text
    return [(m["role"], m["content"], m["status"]) for m in response.json()["data"]]


def provider_for(base_url: str, **kwargs: Any) -> OpenAICompatibleProvider:
    options: dict[str, Any] = {"model": "elara", "api_key": "unused", "timeout_seconds": 10.0, "max_retries": 0}
    options.update(kwargs)
    return OpenAICompatibleProvider(base_url=base_url, **options)


async def test_app_chats_through_the_upstream_over_native_sse(settings: Settings, upstream: Upstream):
    # The upstream's own prompt size (no estimate could give it) must be what the app reports.
    upstream.provider.queue(ScriptedReply("Hello through the upstream.", prompt_tokens=4321), "Second answer.")
    provider = provider_for(upstream.base_url, api_key=upstream.api_key)
    async with app_with(settings, provider) as client:
        health = (await client.get("/health")).json()
        assert health["checks"]["llm"] == {"provider": "openai", "model": "elara", "status": "ok"}

        conversation_id = await new_conversation(client)
        async with client.stream(
            "POST", f"/v1/conversations/{conversation_id}/messages", json={"content": "Hi there"}
        ) as response:
            assert response.status_code == 200, await response.aread()
            assert response.headers["content-type"].startswith("text/event-stream")
            events = [event async for event in iter_sse(response)]

        assert events[0].event == "message" and events[-1].event == "done"
        tokens = [e.json()["text"] for e in events if e.event == "token"]
        assert tokens == ["Hello ", "through ", "the ", "upstream."]
        done = events[-1].json()
        assert done["content"] == "Hello through the upstream."
        assert done["finish_reason"] == "stop"
        assert done["usage"] == {"prompt_tokens": 4321, "completion_tokens": 4, "total_tokens": 4325}
        assert upstream.provider.prompts[0][-1] == ChatMessage("user", "Hi there")

        # The same chain through the app's own OpenAI-compatible API and the stock client.
        key = client.headers["Authorization"].removeprefix("Bearer ")
        async with openai.AsyncOpenAI(base_url=str(client.base_url.join("/v1")), api_key=key, max_retries=0) as oai:
            stream = await oai.chat.completions.create(
                model="elara", messages=[{"role": "user", "content": "Again"}], stream=True
            )
            deltas = [c.choices[0].delta.content async for c in stream if c.choices and c.choices[0].delta.content]
        assert deltas == ["Second ", "answer."]

        assert await stored(client, conversation_id) == [
            ("user", "Hi there", "complete"),
            ("assistant", "Hello through the upstream.", "complete"),
            ("user", "Again", "complete"),
            ("assistant", "Second answer.", "complete"),
        ]


async def test_app_keeps_the_partial_reply_when_the_upstream_fails_mid_reply(settings: Settings, upstream: Upstream):
    upstream.provider.queue(ScriptedReply("a b c", fail_after=2))
    async with app_with(settings, provider_for(upstream.base_url, api_key=upstream.api_key)) as client:
        conversation_id = await new_conversation(client)
        async with client.stream(
            "POST", f"/v1/conversations/{conversation_id}/messages", json={"content": "Hi"}
        ) as response:
            assert response.status_code == 200
            events = [event async for event in iter_sse(response)]
        assert [e.json()["text"] for e in events if e.event == "token"] == ["a ", "b "]
        assert events[-1].event == "error"
        error = events[-1].json()
        assert error["error"]["code"] == "llm_provider_error"
        assert error["message_id"] is not None
        assert await stored(client, conversation_id) == [("user", "Hi", "complete"), ("assistant", "a b ", "error")]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
async def test_unreachable_upstream_is_a_502_json_error(settings: Settings, refused_url: str, stream: bool):
    async with app_with(settings, provider_for(refused_url)) as client:
        conversation_id = await new_conversation(client)
        response = await client.post(
            f"/v1/conversations/{conversation_id}/messages", json={"content": "Anyone there?", "stream": stream}
        )
        error = assert_error_body(response, 502, "llm_provider_error")
        assert error["type"] == "upstream_error"
        assert "Cannot reach the LLM server" in error["message"]
        assert await stored(client, conversation_id) == [("user", "Anyone there?", "complete")]

        response = await client.post(
            "/v1/chat/completions",
            json={"model": "elara", "messages": [{"role": "user", "content": "Hello?"}], "stream": stream},
        )
        assert_error_body(response, 502, "llm_provider_error")


async def test_silent_upstream_is_a_504_json_error(settings: Settings, silent: RawServer):
    async with app_with(settings, provider_for(silent.base_url, timeout_seconds=0.5)) as client:
        conversation_id = await new_conversation(client)
        response = await client.post(f"/v1/conversations/{conversation_id}/messages", json={"content": "Hello?"})
        error = assert_error_body(response, 504, "llm_provider_timeout")
        assert error["type"] == "upstream_error"
        assert await stored(client, conversation_id) == [("user", "Hello?", "complete")]


async def test_a_client_leaving_mid_reply_hangs_up_on_the_upstream(settings: Settings, upstream: Upstream):
    """Closing the app's OpenAI-compatible stream (where a client leaving stops the reply) closes the
    provider's upstream request: neither side waits for the stalled upstream (the provider timeout is
    long), and both keep the partial reply as incomplete."""
    upstream.provider.queue(ScriptedReply("a b c", hang_after=1))
    async with app_with(
        settings, provider_for(upstream.base_url, api_key=upstream.api_key, timeout_seconds=30)
    ) as client:
        conversation_id = await new_conversation(client)
        body = {
            "model": "elara",
            "stream": True,
            "conversation_id": conversation_id,
            "messages": [{"role": "user", "content": "Hi"}],
        }
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            async for event in iter_sse(response):
                if '"content":"a "' in event.data:
                    break

        async def app_settled() -> bool:
            return await stored(client, conversation_id) == [
                ("user", "Hi", "complete"),
                ("assistant", "a ", "incomplete"),
            ]

        await wait_for(app_settled, what="the app to mark the abandoned reply incomplete")

    async def upstream_settled() -> bool:
        messages = await upstream.messages()
        return [(m["role"], m["content"], m["status"]) for m in messages] == [
            ("user", "Hi", "complete"),
            ("assistant", "a ", "incomplete"),
        ]

    await wait_for(upstream_settled, what="the upstream to see the hang-up")


async def test_malformed_upstream_replies_are_502_or_an_error_event(settings: Settings):
    """Before the first token: a 502 JSON error. After it: the stream ends with an `error` event and
    the partial reply is kept with status `error` (not a dropped connection and a 500)."""
    async with (
        raw_server(sse_reply(MALFORMED)) as garbage,
        app_with(settings, provider_for(garbage.base_url)) as client,
    ):
        conversation_id = await new_conversation(client)
        response = await client.post(f"/v1/conversations/{conversation_id}/messages", json={"content": "Hello?"})
        assert (
            assert_error_body(response, 502, "llm_provider_error")["message"]
            == "The LLM server sent a malformed reply."
        )
        assert await stored(client, conversation_id) == [("user", "Hello?", "complete")]

    async with (
        raw_server(sse_reply(GOOD_CHUNK, MALFORMED)) as garbage,
        app_with(settings, provider_for(garbage.base_url)) as client,
    ):
        conversation_id = await new_conversation(client)
        async with client.stream(
            "POST", f"/v1/conversations/{conversation_id}/messages", json={"content": "Hello?"}
        ) as response:
            assert response.status_code == 200
            events = [event async for event in iter_sse(response)]
        assert [(e.event, e.json().get("text")) for e in events[1:-1]] == [("token", "hi ")]
        assert events[-1].event == "error"
        assert events[-1].json()["error"]["code"] == "llm_provider_error"
        assert await stored(client, conversation_id) == [
            ("user", "Hello?", "complete"),
            ("assistant", "hi ", "error"),
        ]
