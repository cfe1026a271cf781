"""Hostile and malformed input: always a 4xx in the one JSON error shape, never a 500, and nothing
stored (the user's data, compared before and after, is unchanged and the model is never called).

Each test runs a table of cases against one server, reporting every failing case as a subtest."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from companion.config import Settings
from companion.llm.scripted import ScriptedProvider
from tests.conftest import make_settings
from tests.support.api import all_messages, assert_error, chat, create_conversation, create_personality, snapshot

MAX_CHARS = 50
MAX_BYTES = 8192
JSON = {"Content-Type": "application/json"}


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    """Small limits for this module, so that going over them is cheap."""
    return make_settings(database_url, tmp_path, max_message_chars=MAX_CHARS, max_request_bytes=MAX_BYTES)


@pytest.fixture
async def conversation_id(client: httpx.AsyncClient) -> str:
    """A conversation that already holds one exchange."""
    conversation_id: str = (await create_conversation(client, "elara"))["id"]
    await chat(client, conversation_id, "Something already stored")
    return conversation_id


class Unchanged:
    """Compares what the user has stored with the moment it was made; `messages()` is the quick
    check after each bad request, `everything()` the full one at the end of a test."""

    def __init__(self, client: httpx.AsyncClient, provider: ScriptedProvider, conversation_id: str) -> None:
        self.client, self.provider, self.conversation_id = client, provider, conversation_id

    async def record(self) -> Unchanged:
        self.before = await snapshot(self.client)
        self.prompts = len(self.provider.prompts)
        assert len(self.before["messages"][self.conversation_id]) == 2
        return self

    async def messages(self) -> None:
        assert await all_messages(self.client, self.conversation_id) == self.before["messages"][self.conversation_id]
        assert len(self.provider.prompts) == self.prompts, "the model was called"

    async def everything(self) -> None:
        assert await snapshot(self.client) == self.before
        assert len(self.provider.prompts) == self.prompts, "the model was called"


@pytest.fixture
async def unchanged(client: httpx.AsyncClient, provider: ScriptedProvider, conversation_id: str) -> Unchanged:
    return await Unchanged(client, provider, conversation_id).record()


def _messages_url(conversation_id: str) -> str:
    return f"/v1/conversations/{conversation_id}/messages"


# --- message content -------------------------------------------------------------------------------

BAD_MESSAGES: list[tuple[str, Any, str]] = [
    ("empty", {"content": ""}, "invalid_input"),
    ("whitespace-only", {"content": " \t\n\r "}, "invalid_input"),
    ("over-max-chars", {"content": "x" * (MAX_CHARS + 1)}, "message_too_long"),
    ("over-max-chars-multibyte", {"content": "é" * (MAX_CHARS + 1)}, "message_too_long"),
    ("nul", {"content": "a\x00b"}, "invalid_input"),
    ("bell", {"content": "ding\x07"}, "invalid_input"),
    ("escape-sequence", {"content": "\x1b[2Jcleared"}, "invalid_input"),
    ("vertical-tab", {"content": "a\x0bb"}, "invalid_input"),
    ("delete", {"content": "a\x7fb"}, "invalid_input"),
    ("c1-control", {"content": "a\x85b"}, "invalid_input"),
    ("number", {"content": 42}, "invalid_input"),
    ("null", {"content": None}, "invalid_input"),
    ("list", {"content": ["hi"]}, "invalid_input"),
    ("object", {"content": {"text": "hi"}}, "invalid_input"),
    ("stream-not-a-bool", {"content": "hi", "stream": "perhaps"}, "invalid_input"),
    ("missing-content", {}, "invalid_input"),
    ("unknown-field", {"content": "hi", "role": "system"}, "invalid_input"),
    ("not-an-object", ["hi"], "invalid_input"),
    ("bare-string", "hi", "invalid_input"),
]


async def test_bad_message_is_rejected_and_nothing_is_stored(
    client: httpx.AsyncClient, conversation_id: str, unchanged: Unchanged, subtests: pytest.Subtests
):
    for case, body, code in BAD_MESSAGES:
        with subtests.test(case):
            response = await client.post(_messages_url(conversation_id), json=body)
            assert_error(response, 422, code)
            await unchanged.messages()
    await unchanged.everything()


BAD_RAW_JSON: list[tuple[str, bytes]] = [
    ("lone-high-surrogate-escape", b'{"content": "\\ud800"}'),
    ("lone-low-surrogate-escape", b'{"content": "a\\udc00b"}'),
    ("nul-escape", b'{"content": "\\u0000"}'),
    ("surrogate-encoded-as-utf8", b'{"content": "\xed\xa0\x80"}'),
    ("infinite-number", b'{"content": 1e999}'),
    ("empty-body", b""),
    ("json-null", b"null"),
    ("truncated", b'{"content": "hi"'),
    ("unquoted-key", b'{content: "hi"}'),
    ("single-quotes", b"{'content': 'hi'}"),
    ("trailing-comma", b'{"content": "hi",}'),
    ("not-json", b"not json at all"),
]


async def test_bad_raw_json_is_422_and_nothing_is_stored(
    client: httpx.AsyncClient, conversation_id: str, unchanged: Unchanged, subtests: pytest.Subtests
):
    for case, raw in BAD_RAW_JSON:
        with subtests.test(case):
            response = await client.post(_messages_url(conversation_id), content=raw, headers=JSON)
            assert_error(response, 422, "invalid_input")
            await unchanged.messages()
    await unchanged.everything()


UNDECODABLE: list[tuple[str, bytes]] = [
    ("latin-1-byte", b'{"content": "caf\xe9"}'),
    ("invalid-utf8-bytes", b'{"content": "\xff\xfe"}'),
    ("overlong-utf8", b'{"content": "\xc0\xaf"}'),
    ("deeply-nested", b"[" * 1500 + b"]" * 1500),
]


async def test_undecodable_body_is_a_400_and_nothing_is_stored(
    client: httpx.AsyncClient, conversation_id: str, unchanged: Unchanged, subtests: pytest.Subtests
):
    # Not UTF-8 (or too deep to parse): FastAPI cannot decode it at all and answers 400.
    for case, raw in UNDECODABLE:
        with subtests.test(case):
            response = await client.post(_messages_url(conversation_id), content=raw, headers=JSON)
            assert_error(response, 400)
            await unchanged.messages()
    await unchanged.everything()


async def test_json_without_a_json_content_type_is_422(
    client: httpx.AsyncClient, conversation_id: str, unchanged: Unchanged, subtests: pytest.Subtests
):
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        with subtests.test(str(content_type)):
            headers = {"Content-Type": content_type} if content_type else {}
            raw = b'{"content": "hi", "stream": false}'
            response = await client.post(_messages_url(conversation_id), content=raw, headers=headers)
            assert_error(response, 422, "invalid_input")
            await unchanged.messages()
    await unchanged.everything()


async def test_tab_and_newline_are_allowed_and_stored_exactly(client: httpx.AsyncClient, conversation_id: str):
    content = "first line\n\tindented\r\nlast"
    done = await chat(client, conversation_id, content)
    page = (await client.get(_messages_url(conversation_id), params={"limit": 2})).json()
    assert page["data"][0]["id"] == done["user_message_id"]
    assert page["data"][0]["content"] == content


async def test_message_of_exactly_max_chars_is_accepted(client: httpx.AsyncClient, conversation_id: str):
    for content in ("x" * MAX_CHARS, "é" * MAX_CHARS, "😀" * MAX_CHARS):
        done = await chat(client, conversation_id, content)
        assert done["content"] == f"You said: {content}"


# --- body size -------------------------------------------------------------------------------------


async def test_body_over_max_request_bytes_is_413(
    client: httpx.AsyncClient, conversation_id: str, unchanged: Unchanged, subtests: pytest.Subtests
):
    body = b'{"content": "' + b"x" * MAX_BYTES + b'"}'
    for method, url in (
        ("POST", _messages_url(conversation_id)),
        ("POST", "/v1/conversations"),
        ("POST", "/v1/personalities"),
        ("PATCH", "/v1/personalities/elara"),
        ("PUT", "/v1/preferences"),
        ("POST", "/v1/chat/completions"),
    ):
        with subtests.test(f"{method} {url}"):
            assert_error(await client.request(method, url, content=body, headers=JSON), 413, "body_too_large")
            await unchanged.messages()
    await unchanged.everything()


async def test_streamed_body_over_max_request_bytes_is_413(
    client: httpx.AsyncClient, conversation_id: str, unchanged: Unchanged
):
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"content": "'
        for _ in range(MAX_BYTES // 512 + 1):
            yield b"x" * 512
        yield b'"}'

    # No Content-Length: the limit is enforced while the body streams in.
    response = await client.post(_messages_url(conversation_id), content=chunks(), headers=JSON)
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "body_too_large")
    await unchanged.everything()


async def test_body_of_exactly_max_request_bytes_is_read(
    client: httpx.AsyncClient, conversation_id: str, unchanged: Unchanged
):
    body = b'{"content": "' + b"x" * (MAX_BYTES - 15) + b'"}'
    assert len(body) == MAX_BYTES
    # Read and validated (too many characters), not refused for its size.
    response = await client.post(_messages_url(conversation_id), content=body, headers=JSON)
    assert_error(response, 422, "message_too_long")
    await unchanged.everything()


# --- personality names -----------------------------------------------------------------------------

HOSTILE_NAMES = [
    "a:*",
    "../x",
    "a/b",
    "x" * 41,
    "x" * 2000,
    "😀",
    "Elara",
    "ELARA",
    "a b",
    "-x",
    "_x",
    "a.b",
    "a*",
    "elara\n",
    "elara\x00",
    "\uff45\uff4c\uff41\uff52\uff41",  # fullwidth "elara"
    "e\u0301lara",
    "%2e%2e",
]


async def test_hostile_personality_name_is_422_on_create(
    client: httpx.AsyncClient, unchanged: Unchanged, subtests: pytest.Subtests
):
    for name in [*HOSTILE_NAMES, "", " "]:
        with subtests.test(repr(name)):
            body = {"name": name, "description": "Hostile.", "system_prompt": "Hostile."}
            error = assert_error(await client.post("/v1/personalities", json=body), 422, "invalid_input")
            assert error["param"] == "name"
            response = await client.post("/v1/conversations", json={"personality": name})
            assert_error(response, 422, "invalid_input")
    await unchanged.everything()


async def test_hostile_personality_name_is_404_on_lookup(
    client: httpx.AsyncClient, unchanged: Unchanged, subtests: pytest.Subtests
):
    for name in HOSTILE_NAMES:
        with subtests.test(repr(name)):
            path = f"/v1/personalities/{quote(name, safe='')}"
            assert_error(await client.get(path), 404)
            assert_error(await client.patch(path, json={"description": "Changed."}), 404)
            assert_error(await client.delete(path), 404)
            models = await client.post(
                "/v1/chat/completions", json={"model": name, "messages": [{"role": "user", "content": "hi"}]}
            )
            assert_error(models, 404, "personality_not_found")
            # As a list filter it matches nothing (or is too long to be a name at all).
            listed = await client.get("/v1/conversations", params={"personality": name})
            if len(name) > 40:
                assert_error(listed, 422, "invalid_input")
            else:
                assert listed.json() == {"data": [], "has_more": False}
    await unchanged.everything()


BAD_PERSONALITY_BODIES: list[tuple[str, dict[str, Any]]] = [
    ("missing-system-prompt", {"description": "d"}),
    ("blank-description", {"description": " ", "system_prompt": "s"}),
    ("system-prompt-too-long", {"description": "d", "system_prompt": "s" * 4001}),
    ("description-too-long", {"description": "d" * 501, "system_prompt": "s"}),
    ("multiline-description", {"description": "two\nlines", "system_prompt": "s"}),
    ("nul-in-system-prompt", {"description": "d", "system_prompt": "s\x00"}),
    ("system-prompt-not-a-string", {"description": "d", "system_prompt": 5}),
    ("unknown-field", {"description": "d", "system_prompt": "s", "scope": "global"}),
    ("long-display-name", {"description": "d", "system_prompt": "s", "display_name": "x" * 81}),
]


async def test_bad_personality_body_is_422(client: httpx.AsyncClient, unchanged: Unchanged, subtests: pytest.Subtests):
    for case, body in BAD_PERSONALITY_BODIES:
        with subtests.test(case):
            response = await client.post("/v1/personalities", json={"name": "pirate", **body})
            assert_error(response, 422, "invalid_input")
    await unchanged.everything()


BAD_PERSONALITY_PATCHES: list[tuple[str, dict[str, Any]]] = [
    ("rename", {"name": "renamed"}),
    ("version", {"version": 99}),
    ("scope", {"scope": "global"}),
    ("empty-system-prompt", {"system_prompt": ""}),
    ("multiline-display-name", {"display_name": "Cap\ntain"}),
]


async def test_bad_personality_patch_is_422_and_changes_nothing(client: httpx.AsyncClient, subtests: pytest.Subtests):
    created = await create_personality(client, "pirate")
    for case, body in BAD_PERSONALITY_PATCHES:
        with subtests.test(case):
            assert_error(await client.patch("/v1/personalities/pirate", json=body), 422, "invalid_input")
    assert (await client.get("/v1/personalities/pirate")).json() == created


# --- conversations: ids, query parameters, bodies ------------------------------------------------------

BAD_IDS = ["not-a-uuid", "1", "' OR '1'='1", "00000000-0000-0000-0000-00000000000g", "\x00", "x" * 300]


async def test_non_uuid_conversation_id_is_422(
    client: httpx.AsyncClient, unchanged: Unchanged, subtests: pytest.Subtests
):
    for bad_id in BAD_IDS:
        with subtests.test(repr(bad_id)):
            url = f"/v1/conversations/{quote(bad_id, safe='')}"
            for response in (
                await client.get(url),
                await client.delete(url),
                await client.get(f"{url}/messages"),
                await client.post(f"{url}/messages", json={"content": "hi", "stream": False}),
            ):
                error = assert_error(response, 422, "invalid_input")
                assert error["param"] == "conversation_id"
            await unchanged.messages()
    await unchanged.everything()


BAD_MESSAGE_PAGES: list[dict[str, Any]] = [
    {"limit": 201},
    {"limit": 10**30},
    {"limit": 0},
    {"limit": -1},
    {"limit": "ten"},
    {"limit": "1.5"},
    {"before": 0},
    {"before": "x"},
    {"before": 2**63},
    {"after": -1},
    {"after": 2**63},
    {"after": 10**30},
]


async def test_bad_message_page_parameters_are_422(
    client: httpx.AsyncClient, conversation_id: str, unchanged: Unchanged, subtests: pytest.Subtests
):
    for params in BAD_MESSAGE_PAGES:
        with subtests.test(str(params)):
            assert_error(await client.get(_messages_url(conversation_id), params=params), 422, "invalid_input")
            await unchanged.messages()
    await unchanged.everything()


BAD_CONVERSATION_PAGES: list[dict[str, Any]] = [
    {"limit": 201},
    {"limit": 10**30},
    {"limit": 0},
    {"offset": -1},
    {"offset": 10**30},
    {"personality": "x" * 41},
]


async def test_bad_conversation_list_parameters_are_422(
    client: httpx.AsyncClient, unchanged: Unchanged, subtests: pytest.Subtests
):
    for params in BAD_CONVERSATION_PAGES:
        with subtests.test(str(params)):
            assert_error(await client.get("/v1/conversations", params=params), 422, "invalid_input")
    await unchanged.everything()


BAD_CONVERSATION_BODIES: list[tuple[str, dict[str, Any]]] = [
    ("unknown-field", {"personality": "elara", "color": "red"}),
    ("personality-not-a-string", {"personality": 5}),
    ("personality-null", {"personality": None}),
    ("personality-missing", {}),
    ("title-not-a-string", {"personality": "elara", "title": 5}),
    ("title-too-long", {"personality": "elara", "title": "t" * 201}),
    ("title-blank", {"personality": "elara", "title": "   "}),
    ("title-multiline", {"personality": "elara", "title": "two\nlines"}),
    ("title-nul", {"personality": "elara", "title": "bad\x00title"}),
]


async def test_bad_conversation_body_is_422(client: httpx.AsyncClient, unchanged: Unchanged, subtests: pytest.Subtests):
    for case, body in BAD_CONVERSATION_BODIES:
        with subtests.test(case):
            assert_error(await client.post("/v1/conversations", json=body), 422, "invalid_input")
    await unchanged.everything()


# --- the OpenAI-compatible endpoint ----------------------------------------------------------------

BAD_COMPLETIONS: list[tuple[str, dict[str, Any], int]] = [
    ("empty", {"messages": [{"role": "user", "content": ""}]}, 422),
    ("whitespace-only", {"messages": [{"role": "user", "content": "  \n"}]}, 422),
    ("too-long", {"messages": [{"role": "user", "content": "x" * (MAX_CHARS + 1)}]}, 422),
    ("nul", {"messages": [{"role": "user", "content": "a\x00b"}]}, 422),
    ("last-not-user", {"messages": [{"role": "assistant", "content": "hi"}]}, 422),
    ("no-messages", {"messages": []}, 422),
    ("messages-not-a-list", {"messages": "hi"}, 422),
    ("unknown-model", {"messages": [{"role": "user", "content": "hi"}], "model": "nobody"}, 404),
]


async def test_bad_chat_completion_stores_nothing(
    client: httpx.AsyncClient, unchanged: Unchanged, subtests: pytest.Subtests
):
    # "luna" has no conversation yet: a rejected request must not start one.
    for case, body, status in BAD_COMPLETIONS:
        for stream in (False, True):
            with subtests.test(case, stream=stream):
                response = await client.post("/v1/chat/completions", json={"model": "luna", "stream": stream, **body})
                assert_error(response, status)
                await unchanged.messages()
    raw = b'{"model": "luna", "messages": [{"role": "user", "content": "\\ud800"}]}'
    assert_error(await client.post("/v1/chat/completions", content=raw, headers=JSON), 422, "invalid_input")
    await unchanged.everything()
