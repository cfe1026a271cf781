"""A turn stores nothing it cannot answer (issue 15, item 6): once the user's message is stored, a
context read that fails (the database going away) leaves that part of the context out and the turn
is still answered; the OpenAI route leaves no empty new conversation behind a request that failed."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import httpx
import pytest

from companion.chat.service import DoneEvent
from companion.chat.summary import Summarizer
from companion.conversations.schemas import MessageOut
from companion.conversations.service import ConversationService
from companion.errors import ServiceUnavailable
from companion.services import Services
from tests.support.api import assert_error


class _HistoryGone(ConversationService):
    """The conversation reads the context makes, with the database gone by then."""

    async def recent_messages(self, conversation_id: uuid.UUID, count: int) -> Sequence[MessageOut]:
        raise ServiceUnavailable("The database is unavailable right now; retry in a few seconds.")


class _SummaryGone(Summarizer):
    async def latest(self, conversation_id: uuid.UUID) -> Any:
        raise ServiceUnavailable("The database is unavailable right now; retry in a few seconds.")


async def test_a_turn_whose_context_cannot_be_read_is_still_answered(services: Services) -> None:
    user = await services.users.create("alice")
    conversation = await services.conversations.create(user.id, "elara")
    context = services.chat._context  # the collaborators the context reads through
    context._conversations = _HistoryGone(services.database, services.clock)
    summarizer = context._summarizer
    assert summarizer is not None
    summarizer.__class__ = _SummaryGone

    turn = await services.chat.begin(user.id, conversation, "are you there?")
    assert turn.prompt[-1].role == "user" and turn.prompt[-1].content == "are you there?"
    events = [event async for event in services.chat.run(turn)]
    assert isinstance(events[-1], DoneEvent), events[-1]
    messages, _ = await services.conversations.list_messages(user.id, conversation.id)
    assert [(m.role, m.status) for m in messages] == [("user", "complete"), ("assistant", "complete")]


async def test_the_openai_route_leaves_no_empty_conversation_behind_a_failed_request(
    client: httpx.AsyncClient, app_services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise ServiceUnavailable("The database is unavailable right now; retry in a few seconds.")

    monkeypatch.setattr(app_services.chat, "begin", unavailable)
    body = {"model": "elara", "messages": [{"role": "user", "content": "hello"}]}
    assert_error(await client.post("/v1/chat/completions", json=body), 503)
    assert (await client.get("/v1/conversations")).json()["data"] == []
    # An existing conversation is of course kept when a later request fails.
    monkeypatch.undo()
    assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
    monkeypatch.setattr(app_services.chat, "begin", unavailable)
    assert_error(await client.post("/v1/chat/completions", json=body), 503)
    assert len((await client.get("/v1/conversations")).json()["data"]) == 1
