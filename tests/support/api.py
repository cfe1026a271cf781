"""Small helpers for talking to the live API in tests: the error-shape check, common calls, a
snapshot of everything a user has stored, and a server built from custom settings."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from companion.app import create_app
from companion.config import Settings
from companion.llm.base import LLMProvider
from companion.types import Clock, utcnow
from tests.conftest import new_client
from tests.support.live import LiveServer

ERROR_FIELDS = {"message", "type", "code", "param"}


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The response is `status` with the one JSON error shape (and `code`, if given); returns `error`."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == ERROR_FIELDS, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and isinstance(error["code"], str), error
    assert error["param"] is None or isinstance(error["param"], str), error
    if code is not None:
        assert error["code"] == code, error
    return error  # type: ignore[no-any-return]


async def create_conversation(client: httpx.AsyncClient, personality: str = "elara", **fields: Any) -> dict[str, Any]:
    response = await client.post("/v1/conversations", json={"personality": personality, **fields})
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


async def create_personality(
    client: httpx.AsyncClient,
    name: str,
    *,
    system_prompt: str = "You are a test personality.",
    description: str = "A personality made by a test.",
    **fields: Any,
) -> dict[str, Any]:
    body = {"name": name, "description": description, "system_prompt": system_prompt, **fields}
    response = await client.post("/v1/personalities", json=body)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


async def chat(client: httpx.AsyncClient, conversation_id: str, content: str) -> dict[str, Any]:
    """One turn without streaming; returns the `done` payload."""
    response = await client.post(
        f"/v1/conversations/{conversation_id}/messages", json={"content": content, "stream": False}
    )
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


async def all_messages(client: httpx.AsyncClient, conversation_id: str) -> list[dict[str, Any]]:
    """Every message of a conversation, oldest first (tests keep conversations under 200 messages)."""
    response = await client.get(f"/v1/conversations/{conversation_id}/messages", params={"limit": 200})
    assert response.status_code == 200, response.text
    page = response.json()
    assert page["has_more"] is False
    return page["data"]  # type: ignore[no-any-return]


async def snapshot(client: httpx.AsyncClient) -> dict[str, Any]:
    """Everything the client's user has stored, to compare before and after a request."""
    conversations = (await client.get("/v1/conversations", params={"limit": 200})).json()
    assert conversations["has_more"] is False
    personalities = await client.get("/v1/personalities")
    preferences = await client.get("/v1/preferences")
    assert personalities.status_code == preferences.status_code == 200
    return {
        "conversations": conversations["data"],
        "messages": {c["id"]: await all_messages(client, c["id"]) for c in conversations["data"]},
        "personalities": personalities.json(),
        "preferences": preferences.json(),
    }


@asynccontextmanager
async def running_server(
    settings: Settings, provider: LLMProvider, *, clock: Clock = utcnow
) -> AsyncIterator[LiveServer]:
    """The real app on uvicorn with these settings, like the conftest `server` fixture."""
    live = LiveServer(create_app(settings, provider=provider, clock=clock))
    await live.start()
    try:
        yield live
    finally:
        await live.stop()


@asynccontextmanager
async def user_client(server: LiveServer, name: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client authenticated as a new user, closed at the end of the block."""
    http = await new_client(server, name)
    async with http:
        yield http
