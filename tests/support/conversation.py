"""Helpers for the conversation-buffer and summary tests: the whole history read back through the
API page by page, the client's own transcript (from which a test knows the prompt window a turn
must have seen), a look at the buffer itself (the raw Redis list, or the in-process one), streamed
turns in the background, and counting the SQL statements that read message rows."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import redis.asyncio as aioredis
from sqlalchemy import event

from companion.cache import keys
from companion.conversations.buffer import MemoryConversationBuffer, RedisConversationBuffer
from companion.conversations.turns import LocalTurnLock, RedisTurnLock
from companion.llm.base import ChatMessage
from companion.llm.context import split_context
from companion.services import Services
from tests.support.api import chat
from tests.support.live import SSEEvent, iter_sse

DEADLINE = 10.0  # seconds; generous, only there so that a regression fails instead of hanging
SUMMARY_LINE = "Summary of the earlier conversation: "
# (A read of the active path starts with its recursive CTE: WITH RECURSIVE path ... SELECT ... FROM messages.)
_SELECT_MESSAGES = re.compile(r"^\s*(WITH\b.*)?SELECT\b.*\bFROM\s+messages\b", re.IGNORECASE | re.DOTALL)

Pair = tuple[str, str]


def pairs(messages: Sequence[ChatMessage] | Sequence[dict[str, Any]]) -> list[Pair]:
    """(role, content) of prompt messages (without the context block the newest user message may
    begin with) or of stored messages (API dicts)."""
    return [(m["role"], m["content"]) if isinstance(m, dict) else (m.role, split_context(m.content)[1]) for m in messages]


def prompt_summary(prompt: Sequence[ChatMessage]) -> str | None:
    """The running summary a prompt carries (in the context block of its newest message), if any;
    it is never in the system message."""
    assert prompt[0].role == "system" and SUMMARY_LINE not in prompt[0].content
    context, _ = split_context(prompt[-1].content)
    found = [line for line in context.splitlines() if line.startswith(SUMMARY_LINE)]
    assert len(found) <= 1, context
    return json.loads(found[0].removeprefix(SUMMARY_LINE)) if found else None  # type: ignore[no-any-return]


def messages_url(conversation_id: str) -> str:
    return f"/v1/conversations/{conversation_id}/messages"


async def paged_history(client: httpx.AsyncClient, conversation_id: str, *, page: int = 7) -> list[dict[str, Any]]:
    """Every message of a conversation, oldest first, read newest page first through `before` and
    `limit` as a client scrolling back would; checks each page is ordered and the pages join up."""
    pages: list[list[dict[str, Any]]] = []
    before: int | None = None
    for _ in range(10_000):
        params: dict[str, int] = {"limit": page}
        if before is not None:
            params["before"] = before
        response = await client.get(messages_url(conversation_id), params=params)
        assert response.status_code == 200, response.text
        body = response.json()
        data = body["data"]
        ids = [m["id"] for m in data]
        assert ids == sorted(set(ids)), f"a page is not in order: {ids}"
        if before is not None:
            assert all(i < before for i in ids), (before, ids)
        pages.append(data)
        if not body["has_more"]:
            break
        assert len(data) == page, body
        before = ids[0]
    messages = [m for data in reversed(pages) for m in data]
    ids = [m["id"] for m in messages]
    assert ids == sorted(set(ids)), "the pages overlap or are out of order"
    return messages


@dataclass
class Transcript:
    """The conversation as the client itself saw it, oldest first: what the test sent and the reply
    text it got back (whole, or as far as it read before a stop). A test builds the prompt window it
    expects from this record and the SHORT_TERM_MEMORY_SIZE it set (`window`, written by hand),
    never from what the server stored: that would repeat the server's own rule back to it."""

    window: int
    said: list[Pair] = field(default_factory=list)

    def send(self, content: str) -> list[Pair]:
        """Record a message the client sends; returns the window its prompt must hold: the newest
        `window` messages the client has seen, ending with this one."""
        self.said.append(("user", content))
        return self.said[-self.window :]

    def receive(self, text: str) -> None:
        """Record the reply text the client received."""
        self.said.append(("assistant", text))

    async def chat(
        self, client: httpx.AsyncClient, conversation_id: str, content: str
    ) -> tuple[dict[str, Any], list[Pair]]:
        """One turn (not streamed), recorded; the `done` payload and the window its prompt must hold."""
        window = self.send(content)
        done = await chat(client, conversation_id, content)
        self.receive(done["content"])
        return done, window


# --- the buffer itself ---------------------------------------------------------------------------


async def redis_buffer(redis_url: str, conversation_id: str | uuid.UUID) -> list[dict[str, Any]]:
    """The raw Redis list of a conversation's buffer (LRANGE 0 -1, decoded), [] when absent."""
    client = aioredis.from_url(redis_url)
    try:
        items = await client.lrange(keys.conversation_buffer(uuid.UUID(str(conversation_id))), 0, -1)
    finally:
        await client.aclose()
    return [orjson.loads(item) for item in items]


async def buffered(services: Services, redis_url: str | None, conversation_id: str) -> list[dict[str, Any]]:
    """The buffer as stored: the raw Redis list (so a duplicate could not hide), or the in-process one
    (read without refreshing or changing it); [] when there is none."""
    if redis_url is not None:
        assert isinstance(services.buffer, RedisConversationBuffer)
        return await redis_buffer(redis_url, conversation_id)
    assert isinstance(services.buffer, MemoryConversationBuffer)
    found = await services.buffer.recent(uuid.UUID(conversation_id), services.buffer.max_messages)
    return [m.model_dump() for m in found or []]


async def redis_command(redis_url: str, *args: Any) -> Any:
    client = aioredis.from_url(redis_url)
    try:
        return await client.execute_command(*args)
    finally:
        await client.aclose()


def turns_waiting(services: Services, conversation_id: str) -> int:
    """How many turns of this instance hold or wait for the conversation (the turn lock's own
    bookkeeping): lets a test know a second message is queued before it releases the first."""
    lock = services.chat._turns
    local = lock._local if isinstance(lock, RedisTurnLock) else lock
    assert isinstance(local, LocalTurnLock)
    return local.users(uuid.UUID(conversation_id))


# --- SQL -----------------------------------------------------------------------------------------


@dataclass
class MessageReads:
    """The SELECTs of message rows run on some instances' engines, each with the name of the asyncio
    task that ran it, so that the background summarizer (tasks `summarize-<conversation>`) and the
    reply sweeper can be told apart from the turns themselves."""

    statements: list[tuple[str, str]] = field(default_factory=list)

    def record(self, _conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if _SELECT_MESSAGES.search(statement):
            task = asyncio.current_task()
            self.statements.append((task.get_name() if task is not None else "", statement))

    @property
    def by_turns(self) -> list[str]:
        # Neither the background summarizer nor the sweeper of dead replies (every few seconds) is a turn.
        return [s for name, s in self.statements if not name.startswith(("summarize-", "reply-sweeper"))]

    @property
    def by_summarizer(self) -> list[str]:
        return [s for name, s in self.statements if name.startswith("summarize-")]

    def clear(self) -> None:
        self.statements.clear()


@contextmanager
def message_reads(*services: Services) -> Iterator[MessageReads]:
    """Record the SELECTs of message rows on these instances' engines while the block runs."""
    reads = MessageReads()
    engines = [s.database.engine.sync_engine for s in services]
    for engine in engines:
        event.listen(engine, "before_cursor_execute", reads.record)
    try:
        yield reads
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", reads.record)


# --- streamed turns ------------------------------------------------------------------------------


def open_stream(client: httpx.AsyncClient, conversation_id: str, content: str) -> asyncio.Task[httpx.Response]:
    """Send a streamed turn in the background; the task resolves when the response headers arrive
    (the caller closes the response)."""
    request = client.build_request("POST", messages_url(conversation_id), json={"content": content})
    return asyncio.create_task(client.send(request, stream=True))


async def next_event(events: AsyncIterator[SSEEvent]) -> SSEEvent:
    async with asyncio.timeout(DEADLINE):
        return await anext(events)


async def rest_of(events: AsyncIterator[SSEEvent]) -> list[SSEEvent]:
    async with asyncio.timeout(DEADLINE):
        return [event async for event in events]


async def chat_stream(client: httpx.AsyncClient, conversation_id: str, content: str) -> list[SSEEvent]:
    """One streamed turn, read to the end."""
    async with asyncio.timeout(DEADLINE):
        async with client.stream("POST", messages_url(conversation_id), json={"content": content}) as response:
            assert response.status_code == 200, await response.aread()
            return [event async for event in iter_sse(response)]


def release(gate: asyncio.Semaphore, tokens: int) -> None:
    for _ in range(tokens):
        gate.release()
