"""The OpenAI-compatible API (POST /v1/chat/completions, GET /v1/models) through real clients: the
stock `openai` package and plain `curl`, against the real app on uvicorn, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionUserMessageParam

from companion.llm.context import split_context
from companion.llm.scripted import ScriptedProvider, ScriptedReply
from companion.personalities.builtin import BUILTIN_PERSONALITIES
from tests.conftest import new_client
from tests.support.live import LiveServer

GLOBAL_NAMES = sorted(p.name for p in BUILTIN_PERSONALITIES)
ERROR_FIELDS = {"message", "type", "code", "param"}


@pytest.fixture
async def oai(server: LiveServer, api_key: str) -> AsyncIterator[openai.AsyncOpenAI]:
    """The stock client, without retries so that every failure is seen exactly once."""
    async with openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key=api_key, max_retries=0, timeout=30) as c:
        yield c


def user(content: str) -> ChatCompletionUserMessageParam:
    return {"role": "user", "content": content}


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """`status` with OpenAI's error shape `{"error": {"message", "type", "code", "param"}}`; returns `error`."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == ERROR_FIELDS, error
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code, error
    found: dict[str, Any] = error
    return found


def assert_status_error(error: openai.APIStatusError, status: int, code: str, error_type: str) -> None:
    """The openai client parsed our error body: status, code and type come through."""
    assert error.status_code == status
    assert isinstance(error.body, dict) and set(error.body) == ERROR_FIELDS, error.body
    assert error.code == code
    assert error.type == error_type
    assert error.message and error.body["message"] in error.message


async def messages_of(client: httpx.AsyncClient, conversation_id: str) -> list[tuple[str, str, str]]:
    response = await client.get(f"/v1/conversations/{conversation_id}/messages", params={"limit": 200})
    assert response.status_code == 200, response.text
    return [(m["role"], m["content"], m["status"]) for m in response.json()["data"]]


async def conversations_of(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    response = await client.get("/v1/conversations", params={"limit": 200})
    assert response.status_code == 200, response.text
    data: list[dict[str, Any]] = response.json()["data"]
    return data


async def new_conversation(client: httpx.AsyncClient, personality: str = "elara") -> str:
    response = await client.post("/v1/conversations", json={"personality": personality})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def extra(model: Any, name: str) -> Any:
    """A field that OpenAI's schema does not know (our `conversation_id`), kept by the client's models."""
    assert model.model_extra is not None and name in model.model_extra, model
    return model.model_extra[name]


# --- the stock openai client: non-stream, stream, usage, models --------------------------------------


async def test_non_stream_completion_returns_the_reply_and_usage(
    oai: openai.AsyncOpenAI, client: httpx.AsyncClient, provider: ScriptedProvider
):
    provider.queue(ScriptedReply("Hello there, friend.", prompt_tokens=1234))
    raw = await oai.chat.completions.with_raw_response.create(model="elara", messages=[user("Hi Elara")])
    completion = raw.parse()

    assert completion.object == "chat.completion"
    assert completion.model == "elara"
    assert completion.id.startswith("chatcmpl-")
    assert len(completion.choices) == 1
    choice = completion.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content == "Hello there, friend."
    assert choice.finish_reason == "stop"

    # The provider's own figures (1,234 prompt tokens as scripted, three words generated).
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 3
    assert completion.usage.prompt_tokens == 1234
    assert completion.usage.total_tokens == 1237

    conversation_id = extra(completion, "conversation_id")
    assert raw.headers["x-conversation-id"] == conversation_id
    assert await messages_of(client, conversation_id) == [
        ("user", "Hi Elara", "complete"),
        ("assistant", "Hello there, friend.", "complete"),
    ]
    # The prompt was built server-side from the personality, not from the client.
    assert provider.prompts[0][0].role == "system" and "Elara" in provider.prompts[0][0].content


async def test_generation_parameters_reach_the_provider(oai: openai.AsyncOpenAI, provider: ScriptedProvider):
    provider.queue("one two three four five")
    completion = await oai.chat.completions.create(
        model="elara", messages=[user("Count")], max_tokens=2, temperature=0.25, top_p=0.5, n=1
    )
    assert completion.choices[0].message.content == "one two "
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 2
    assert provider.params[0].max_tokens == 2
    assert provider.params[0].temperature == 0.25

    provider.queue("six seven eight")
    completion = await oai.chat.completions.create(model="elara", messages=[user("Again")], max_completion_tokens=1)
    assert completion.choices[0].message.content == "six "
    assert provider.params[1].max_tokens == 1


async def test_streaming_yields_content_deltas_in_order(oai: openai.AsyncOpenAI, provider: ScriptedProvider):
    provider.queue("one two three four")
    raw = await oai.chat.completions.with_raw_response.create(
        model="elara", messages=[user("Count for me")], stream=True
    )
    assert raw.headers["content-type"].startswith("text/event-stream")
    conversation_id = raw.headers["x-conversation-id"]
    chunks = [chunk async for chunk in raw.parse()]

    assert all(c.object == "chat.completion.chunk" and c.model == "elara" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(extra(c, "conversation_id") == conversation_id for c in chunks)
    assert all(c.usage is None for c in chunks), "no usage chunk unless asked for"

    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert deltas == ["one ", "two ", "three ", "four"]
    assert "".join(deltas) == "one two three four"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


async def test_streaming_delivers_each_token_as_it_is_generated(oai: openai.AsyncOpenAI, provider: ScriptedProvider):
    """Tokens are paced by a semaphore: each delta reaches the client before the next one exists."""
    gate = asyncio.Semaphore(0)
    provider.queue(ScriptedReply("alpha beta gamma", gate=gate))
    gate.release()  # the server waits for the first token before it answers
    stream = await oai.chat.completions.create(model="elara", messages=[user("Slowly")], stream=True)
    async with stream:
        iterator = stream.__aiter__()
        first = await asyncio.wait_for(anext(iterator), 10)
        assert first.choices[0].delta.role == "assistant"
        assert (await asyncio.wait_for(anext(iterator), 10)).choices[0].delta.content == "alpha "
        for expected in ("beta ", "gamma"):
            gate.release()
            chunk = await asyncio.wait_for(anext(iterator), 10)
            assert chunk.choices[0].delta.content == expected
        rest = [chunk async for chunk in iterator]
    assert [c.choices[0].finish_reason for c in rest] == ["stop"]


async def test_stream_options_include_usage_adds_a_usage_chunk(oai: openai.AsyncOpenAI, provider: ScriptedProvider):
    provider.queue(ScriptedReply("a b c", prompt_tokens=777))
    stream = await oai.chat.completions.create(
        model="elara", messages=[user("Hi")], stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]

    usage_chunks = [c for c in chunks if c.usage is not None]
    assert usage_chunks == [chunks[-1]], "exactly one usage chunk, last"
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 3
    assert last.usage.prompt_tokens == 777
    assert last.usage.total_tokens == 780
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "a b c"


async def test_models_lists_the_global_personalities_and_the_users_own(
    oai: openai.AsyncOpenAI, client: httpx.AsyncClient, server: LiveServer
):
    models = [m async for m in oai.models.list()]
    assert sorted(m.id for m in models) == GLOBAL_NAMES
    assert len(models) == 8
    assert all(m.object == "model" and m.owned_by == "companion" for m in models)
    personalities = {p["name"]: p for p in (await client.get("/v1/personalities")).json()}
    for model in models:
        assert model.created == int(datetime.fromisoformat(personalities[model.id]["created_at"]).timestamp())

    body = {"name": "mira", "description": "A test personality.", "system_prompt": "You are Mira."}
    assert (await client.post("/v1/personalities", json=body)).status_code == 201
    by_id = {m.id: m for m in [m async for m in oai.models.list()]}
    assert sorted(by_id) == sorted([*GLOBAL_NAMES, "mira"])
    assert by_id["mira"].owned_by == "you"
    assert {m.owned_by for name, m in by_id.items() if name != "mira"} == {"companion"}

    # Another user sees only the globals.
    async with await new_client(server, "bob") as bob:
        response = await bob.get("/v1/models")
    assert response.status_code == 200
    assert sorted(m["id"] for m in response.json()["data"]) == GLOBAL_NAMES

    # The user's own model can be chatted with through the OpenAI API.
    completion = await oai.chat.completions.create(model="mira", messages=[user("Hello Mira")])
    assert completion.model == "mira"
    conversation = await client.get(f"/v1/conversations/{extra(completion, 'conversation_id')}")
    assert conversation.json()["personality"] == "mira"


async def test_models_shadowed_global_is_owned_by_the_user(oai: openai.AsyncOpenAI, client: httpx.AsyncClient):
    body = {"name": "elara", "description": "My own Elara.", "system_prompt": "You are my Elara."}
    assert (await client.post("/v1/personalities", json=body)).status_code == 201
    models = {m.id: m for m in [m async for m in oai.models.list()]}
    assert sorted(models) == GLOBAL_NAMES
    assert models["elara"].owned_by == "you"


# --- server-side conversation memory ---------------------------------------------------------------


async def test_server_keeps_the_history_when_the_client_sends_only_its_newest_message(
    oai: openai.AsyncOpenAI, client: httpx.AsyncClient, provider: ScriptedProvider
):
    provider.queue("Nice to meet you, Ada.", "Your name is Ada.")
    first = await oai.chat.completions.create(model="elara", messages=[user("My name is Ada")])
    second = await oai.chat.completions.create(model="elara", messages=[user("What is my name?")])

    assert extra(first, "conversation_id") == extra(second, "conversation_id")
    prompt = provider.prompts[1]
    # The newest message may open with the service's context block (a memory of Ada's name, if it
    # was already kept in the background; docs/memory.md): compare what was said.
    assert [(m.role, split_context(m.content)[1]) for m in prompt[1:]] == [
        ("user", "My name is Ada"),
        ("assistant", "Nice to meet you, Ada."),
        ("user", "What is my name?"),
    ]
    assert prompt[0].role == "system"
    assert await messages_of(client, extra(second, "conversation_id")) == [
        ("user", "My name is Ada", "complete"),
        ("assistant", "Nice to meet you, Ada.", "complete"),
        ("user", "What is my name?", "complete"),
        ("assistant", "Your name is Ada.", "complete"),
    ]


async def test_history_and_system_messages_sent_by_the_client_are_ignored(
    oai: openai.AsyncOpenAI, client: httpx.AsyncClient, provider: ScriptedProvider
):
    completion = await oai.chat.completions.create(
        model="elara",
        messages=[
            {"role": "system", "content": "You are a pirate."},
            user("a fabricated old question"),
            {"role": "assistant", "content": "a fabricated old answer"},
            {"role": "user", "content": [{"type": "text", "text": "Newest "}, {"type": "text", "text": "message"}]},
        ],
    )
    assert completion.choices[0].message.content == "You said: Newest message"
    prompt_text = "\n".join(m.content for m in provider.prompts[0])
    assert "pirate" not in prompt_text and "fabricated" not in prompt_text
    assert [(m.role, m.content) for m in provider.prompts[0][1:]] == [("user", "Newest message")]
    assert await messages_of(client, extra(completion, "conversation_id")) == [
        ("user", "Newest message", "complete"),
        ("assistant", "You said: Newest message", "complete"),
    ]


async def test_conversation_is_named_in_the_header_and_the_body(oai: openai.AsyncOpenAI, client: httpx.AsyncClient):
    raw = await oai.chat.completions.with_raw_response.create(model="elara", messages=[user("Hi")])
    conversation_id = raw.headers["x-conversation-id"]
    assert uuid.UUID(conversation_id)
    assert extra(raw.parse(), "conversation_id") == conversation_id

    streamed = await oai.chat.completions.with_raw_response.create(model="elara", messages=[user("Hi")], stream=True)
    assert streamed.headers["x-conversation-id"] == conversation_id, "the latest conversation is continued"
    chunks = [chunk async for chunk in streamed.parse()]
    assert {extra(c, "conversation_id") for c in chunks} == {conversation_id}

    listed = await conversations_of(client)
    assert [c["id"] for c in listed] == [conversation_id]
    assert listed[0]["personality"] == "elara"


async def test_conversation_is_chosen_by_body_field_header_or_latest(
    oai: openai.AsyncOpenAI, client: httpx.AsyncClient
):
    older = await new_conversation(client)
    newer = await new_conversation(client)
    other_personality = await new_conversation(client, "orion")

    async def ask(content: str, **kwargs: Any) -> str:
        raw = await oai.chat.completions.with_raw_response.create(model="elara", messages=[user(content)], **kwargs)
        conversation_id = raw.headers["x-conversation-id"]
        assert extra(raw.parse(), "conversation_id") == conversation_id
        return conversation_id

    # Default: the most recent conversation with this personality (not the newer orion one).
    assert await ask("to the latest") == newer
    # Named by the body field: the older one, which thereby becomes the latest.
    assert await ask("by body", extra_body={"conversation_id": older}) == older
    assert await ask("latest again") == older
    # Named by the header.
    assert await ask("by header", extra_headers={"X-Conversation-Id": newer}) == newer
    # Streaming honours the header too.
    raw = await oai.chat.completions.with_raw_response.create(
        model="elara", messages=[user("streamed by header")], stream=True, extra_headers={"X-Conversation-Id": older}
    )
    assert raw.headers["x-conversation-id"] == older
    assert [c async for c in raw.parse()]

    assert [m[1] for m in await messages_of(client, older) if m[0] == "user"] == [
        "by body",
        "latest again",
        "streamed by header",
    ]
    assert [m[1] for m in await messages_of(client, newer) if m[0] == "user"] == ["to the latest", "by header"]
    assert await messages_of(client, other_personality) == []

    # Another personality gets its own conversation, created on first use.
    juniper = (
        await oai.chat.completions.with_raw_response.create(model="juniper", messages=[user("Hi Juniper")])
    ).headers["x-conversation-id"]
    assert juniper not in {older, newer, other_personality}
    assert (await client.get(f"/v1/conversations/{juniper}")).json()["personality"] == "juniper"


async def test_conversation_with_another_personality_is_rejected(
    oai: openai.AsyncOpenAI, client: httpx.AsyncClient, provider: ScriptedProvider
):
    orion = await new_conversation(client, "orion")
    choices: list[dict[str, Any]] = [
        {"extra_body": {"conversation_id": orion}},
        {"extra_headers": {"X-Conversation-Id": orion}},
    ]
    for kwargs in choices:
        with pytest.raises(openai.UnprocessableEntityError) as caught:
            await oai.chat.completions.create(model="elara", messages=[user("Hi")], **kwargs)
        assert_status_error(caught.value, 422, "invalid_input", "invalid_request_error")
        assert caught.value.param == "conversation_id"
        assert "orion" in caught.value.message
    assert await messages_of(client, orion) == []
    assert [c["id"] for c in await conversations_of(client)] == [orion]
    assert provider.prompts == []


async def test_another_users_conversation_is_not_found(
    oai: openai.AsyncOpenAI, client: httpx.AsyncClient, server: LiveServer, provider: ScriptedProvider
):
    async with await new_client(server, "bob") as bob:
        bobs = await new_conversation(bob)
        choices: list[dict[str, Any]] = [
            {"extra_body": {"conversation_id": bobs}},
            {"extra_headers": {"X-Conversation-Id": bobs}},
            {"extra_body": {"conversation_id": str(uuid.uuid4())}},
        ]
        for kwargs in choices:
            with pytest.raises(openai.NotFoundError) as caught:
                await oai.chat.completions.create(model="elara", messages=[user("Hi")], **kwargs)
            assert_status_error(caught.value, 404, "conversation_not_found", "not_found_error")
        assert await messages_of(bob, bobs) == []
    assert await conversations_of(client) == []
    assert provider.prompts == []


async def test_malformed_conversation_id_is_rejected(client: httpx.AsyncClient):
    body = {"model": "elara", "messages": [user("Hi")]}
    response = await client.post("/v1/chat/completions", json={**body, "conversation_id": "not-a-uuid"})
    assert assert_openai_error(response, 422, "invalid_input")["param"] == "conversation_id"
    response = await client.post("/v1/chat/completions", json=body, headers={"X-Conversation-Id": "not-a-uuid"})
    assert_openai_error(response, 422, "invalid_input")
    assert await conversations_of(client) == []


# --- plain curl ------------------------------------------------------------------------------------


async def run_curl(*args: str) -> bytes:
    """curl in a subprocess, awaited without blocking the loop that runs the server."""
    process = await asyncio.create_subprocess_exec(
        "curl", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode == 0, (process.returncode, stderr)
    return stdout


def curl_chat_args(server: LiveServer, api_key: str, headers_file: Path, body: dict[str, Any]) -> list[str]:
    return [
        "-sN",
        "-D",
        str(headers_file),
        "-X",
        "POST",
        f"{server.base_url}/v1/chat/completions",
        "-H",
        f"Authorization: Bearer {api_key}",
        "-H",
        "Content-Type: application/json",
        "-d",
        json.dumps(body),
    ]


def read_headers(path: Path) -> tuple[int, dict[str, str]]:
    lines = path.read_text().splitlines()
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return status, headers


async def test_curl_non_stream(
    server: LiveServer, api_key: str, client: httpx.AsyncClient, provider: ScriptedProvider, tmp_path: Path
):
    provider.queue("Hello from the server.")
    headers_file = tmp_path / "headers.txt"
    out = await run_curl(
        *curl_chat_args(server, api_key, headers_file, {"model": "elara", "messages": [user("Hi from curl")]})
    )
    status, headers = read_headers(headers_file)
    assert status == 200
    assert headers["content-type"].startswith("application/json")
    body = json.loads(out)
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello from the server."}
    assert body["usage"]["completion_tokens"] == 4
    assert body["conversation_id"] == headers["x-conversation-id"]
    assert await messages_of(client, body["conversation_id"]) == [
        ("user", "Hi from curl", "complete"),
        ("assistant", "Hello from the server.", "complete"),
    ]


async def test_curl_stream(server: LiveServer, api_key: str, provider: ScriptedProvider, tmp_path: Path):
    provider.queue("Streaming to curl works.")
    headers_file = tmp_path / "headers.txt"
    body = {"model": "elara", "messages": [user("Hi")], "stream": True, "stream_options": {"include_usage": True}}
    out = (await run_curl(*curl_chat_args(server, api_key, headers_file, body))).decode()

    status, headers = read_headers(headers_file)
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    assert out.endswith("data: [DONE]\n\n")
    lines = [line for line in out.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    assert {c["conversation_id"] for c in chunks} == {headers["x-conversation-id"]}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert [d for d in deltas if d] == ["Streaming ", "to ", "curl ", "works."]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


async def test_curl_error_is_json(server: LiveServer, tmp_path: Path):
    headers_file = tmp_path / "headers.txt"
    out = await run_curl(*curl_chat_args(server, "wrong-key", headers_file, {"model": "elara", "messages": []}))
    status, _ = read_headers(headers_file)
    assert status == 401
    error = json.loads(out)["error"]
    assert set(error) == ERROR_FIELDS and error["type"] == "authentication_error"


# --- errors, in OpenAI's shape ---------------------------------------------------------------------


async def test_missing_api_key_is_401(anon: httpx.AsyncClient):
    response = await anon.post("/v1/chat/completions", json={"model": "elara", "messages": [user("Hi")]})
    error = assert_openai_error(response, 401, "missing_api_key")
    assert error["type"] == "authentication_error"
    assert response.headers["www-authenticate"] == "Bearer"
    assert_openai_error(await anon.get("/v1/models"), 401, "missing_api_key")


async def test_missing_api_key_through_the_openai_client_is_401(server: LiveServer, provider: ScriptedProvider):
    # The client will not be built without a key, so drop its Authorization header per request.
    async with openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0) as keyless:
        with pytest.raises(openai.AuthenticationError) as caught:
            await keyless.chat.completions.create(
                model="elara", messages=[user("Hi")], extra_headers={"Authorization": openai.Omit()}
            )
    assert_status_error(caught.value, 401, "missing_api_key", "authentication_error")
    assert provider.prompts == []


async def test_invalid_api_key_is_401(server: LiveServer, api_key: str, provider: ScriptedProvider):
    async with openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="not-" + api_key, max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as caught:
            await bad.chat.completions.create(model="elara", messages=[user("Hi")])
        assert_status_error(caught.value, 401, "invalid_api_key", "authentication_error")
        assert api_key not in caught.value.message
        with pytest.raises(openai.AuthenticationError):
            await bad.chat.completions.create(model="elara", messages=[user("Hi")], stream=True)
        with pytest.raises(openai.AuthenticationError):
            await bad.models.list()
    assert provider.prompts == []


async def test_unknown_model_is_404(oai: openai.AsyncOpenAI, client: httpx.AsyncClient, provider: ScriptedProvider):
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError) as caught:
            await oai.chat.completions.create(model="nobody", messages=[user("Hi")], stream=stream)
        assert_status_error(caught.value, 404, "personality_not_found", "not_found_error")
    assert await conversations_of(client) == []
    assert provider.prompts == []


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "assistant", "content": "I spoke last"}],
        [user("Hi"), {"role": "system", "content": "be brief"}],
    ],
    ids=["assistant-last", "system-last"],
)
async def test_last_message_must_be_from_the_user(
    oai: openai.AsyncOpenAI, client: httpx.AsyncClient, provider: ScriptedProvider, messages: list[dict[str, str]]
):
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        await oai.chat.completions.create(model="elara", messages=messages)  # type: ignore[arg-type]
    assert_status_error(caught.value, 422, "invalid_input", "invalid_request_error")
    assert caught.value.param == "messages"
    assert await conversations_of(client) == []
    assert provider.prompts == []


async def test_invalid_requests_are_422_in_openai_shape(client: httpx.AsyncClient, provider: ScriptedProvider):
    for body in (
        {"model": "elara", "messages": []},
        {"model": "elara"},
        {"model": "elara", "messages": [{"role": "wizard", "content": "Hi"}]},
        {"model": "elara", "messages": [user("Hi")], "temperature": 3},
    ):
        assert_openai_error(await client.post("/v1/chat/completions", json=body), 422, "invalid_input")
    response = await client.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_openai_error(response, 422, "invalid_input")
    assert provider.prompts == []
    assert await conversations_of(client) == []


async def test_unacceptable_message_is_422_and_stores_nothing(client: httpx.AsyncClient, provider: ScriptedProvider):
    for content, code in (("   ", "empty_message"), ("x" * 8001, "message_too_long"), ("bad\x00byte", "invalid_input")):
        response = await client.post("/v1/chat/completions", json={"model": "elara", "messages": [user(content)]})
        assert_openai_error(response, 422, code)
    assert provider.prompts == []
    assert await conversations_of(client) == [], "a rejected message must not create a conversation"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(
    ("reply", "status", "code", "error_class"),
    [
        (ScriptedReply("a b c", fail_after=0), 502, "llm_provider_error", openai.InternalServerError),
        (ScriptedReply("a b c", timeout_after=0), 504, "llm_provider_timeout", openai.InternalServerError),
    ],
    ids=["fails", "times-out"],
)
async def test_provider_failure_before_the_first_token(
    oai: openai.AsyncOpenAI,
    client: httpx.AsyncClient,
    provider: ScriptedProvider,
    reply: ScriptedReply,
    status: int,
    code: str,
    error_class: type[openai.APIStatusError],
    stream: bool,
):
    provider.queue(reply)
    with pytest.raises(error_class) as caught:
        await oai.chat.completions.create(model="elara", messages=[user("Hi")], stream=stream)
    assert_status_error(caught.value, status, code, "upstream_error")
    assert len(provider.prompts) == 1, "no retry"
    # The user's message was stored before generation; no reply was.
    (conversation,) = await conversations_of(client)
    assert await messages_of(client, conversation["id"]) == [("user", "Hi", "complete")]


async def test_provider_failure_before_the_first_token_over_raw_http(
    client: httpx.AsyncClient, provider: ScriptedProvider
):
    provider.queue(ScriptedReply("a b c", fail_after=0), ScriptedReply("a b c", timeout_after=0))
    body = {"model": "elara", "messages": [user("Hi")], "stream": True}
    assert_openai_error(await client.post("/v1/chat/completions", json=body), 502, "llm_provider_error")
    assert_openai_error(await client.post("/v1/chat/completions", json=body), 504, "llm_provider_timeout")


async def test_failure_mid_stream_raises_api_error_after_the_partial_reply(
    oai: openai.AsyncOpenAI, client: httpx.AsyncClient, provider: ScriptedProvider
):
    provider.queue(ScriptedReply("a b c", fail_after=2))
    raw = await oai.chat.completions.with_raw_response.create(model="elara", messages=[user("Hi")], stream=True)
    assert raw.http_response.status_code == 200
    conversation_id = raw.headers["x-conversation-id"]
    deltas: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        async for chunk in raw.parse():
            if chunk.choices and chunk.choices[0].delta.content:
                deltas.append(chunk.choices[0].delta.content)
    assert deltas == ["a ", "b "]
    error = caught.value
    assert not isinstance(error, openai.APIStatusError), "the status was already 200"
    assert error.code == "llm_provider_error" and error.type == "upstream_error"
    assert error.message == "The scripted provider failed as scripted."
    assert await messages_of(client, conversation_id) == [
        ("user", "Hi", "complete"),
        ("assistant", "a b ", "error"),
    ]


async def test_failure_mid_stream_over_raw_http_ends_with_an_error_event_and_done(
    client: httpx.AsyncClient, provider: ScriptedProvider
):
    provider.queue(ScriptedReply("a b c", fail_after=2))
    body = {"model": "elara", "messages": [user("Hi")], "stream": True}
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        lines = [line async for line in response.aiter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    payloads = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    assert set(payloads[-1]) == {"error"} and set(payloads[-1]["error"]) == ERROR_FIELDS
    assert payloads[-1]["error"]["code"] == "llm_provider_error"
    assert [p["choices"][0]["delta"].get("content") for p in payloads[1:-1]] == ["a ", "b "]


async def test_failure_mid_reply_without_streaming_is_502_and_keeps_the_partial_reply(
    oai: openai.AsyncOpenAI, client: httpx.AsyncClient, provider: ScriptedProvider
):
    provider.queue(ScriptedReply("a b c", fail_after=2))
    with pytest.raises(openai.InternalServerError) as caught:
        await oai.chat.completions.create(model="elara", messages=[user("Hi")])
    assert_status_error(caught.value, 502, "llm_provider_error", "upstream_error")
    (conversation,) = await conversations_of(client)
    assert await messages_of(client, conversation["id"]) == [
        ("user", "Hi", "complete"),
        ("assistant", "a b ", "error"),
    ]
