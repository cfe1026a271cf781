"""Native chat API: conversations, their messages, and a turn streamed as Server-Sent Events."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from starlette.responses import JSONResponse

from companion.api.deps import ServicesDep, UserIdDep
from companion.api.sse import sse_event, sse_response
from companion.chat.service import ChatEvent, DoneEvent, ErrorEvent, TokenEvent, Turn
from companion.conversations.schemas import (
    ConversationCreate,
    ConversationOut,
    ConversationPage,
    MessageIn,
    MessagePage,
)
from companion.errors import CompanionError
from companion.services import Services
from companion.types import is_valid_name

router = APIRouter(prefix="/v1/conversations", tags=["conversations"])
# Message ids are 64-bit signed integers on every backend; a bigger cursor must be a 422, not an overflow.
MAX_MESSAGE_ID = 2**63 - 1

STREAM_DESCRIPTION = """The reply streams as Server-Sent Events:

* `event: message` once, first: `{"user_message_id": int, "conversation_id": str}`, the stored user message;
* `event: token` for each piece of text: `{"text": str}`;
* `event: done` last: `{"message_id", "user_message_id", "content", "finish_reason", "usage": {"prompt_tokens",
  "completion_tokens", "total_tokens"}}`;
* or `event: error` last: `{"error": {...}, "message_id": int | null}` when the model failed mid-reply;
  the text generated so far is kept, with status `error`.

A provider failure before the first token answers 502/504 JSON instead of a stream. With `"stream": false`
the reply comes back as one JSON object (the `done` payload)."""


@router.post("", status_code=201, response_model=ConversationOut)
async def create_conversation(body: ConversationCreate, user_id: UserIdDep, services: ServicesDep) -> ConversationOut:
    personality = await services.personalities.resolve(user_id, body.personality)
    return await services.chat.open_conversation(user_id, personality, body.title)


@router.get("", response_model=ConversationPage)
async def list_conversations(
    user_id: UserIdDep,
    services: ServicesDep,
    personality: Annotated[str | None, Query(max_length=40)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> ConversationPage:
    if personality is not None and not is_valid_name(personality):
        return ConversationPage(data=[], has_more=False)
    data, has_more = await services.conversations.list(user_id, personality=personality, limit=limit, offset=offset)
    return ConversationPage(data=data, has_more=has_more)


@router.get("/{conversation_id}", response_model=ConversationOut)
async def get_conversation(conversation_id: uuid.UUID, user_id: UserIdDep, services: ServicesDep) -> ConversationOut:
    return await services.conversations.get(user_id, conversation_id)


@router.delete("/{conversation_id}", status_code=204)
async def delete_conversation(conversation_id: uuid.UUID, user_id: UserIdDep, services: ServicesDep) -> Response:
    await services.conversations.delete(user_id, conversation_id)
    return Response(status_code=204)


@router.get("/{conversation_id}/messages", response_model=MessagePage)
async def list_messages(
    conversation_id: uuid.UUID,
    user_id: UserIdDep,
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    before: Annotated[
        int | None, Query(ge=1, le=MAX_MESSAGE_ID, description="Only messages older than this id.")
    ] = None,
    after: Annotated[
        int | None, Query(ge=0, le=MAX_MESSAGE_ID, description="Only messages newer than this id.")
    ] = None,
    tree: Annotated[
        bool,
        Query(
            description="false (default): the active path, each message with its alternatives' ids in `siblings`; "
            "true: every message of the conversation's tree (follow `parent_id`), alternatives and old branches too."
        ),
    ] = False,
) -> MessagePage:
    data, has_more = await services.conversations.list_messages(
        user_id, conversation_id, limit=limit, before=before, after=after, whole_tree=tree
    )
    return MessagePage(data=data, has_more=has_more)


def done_payload(event: DoneEvent) -> dict[str, Any]:
    return {
        "message_id": event.message_id,
        "user_message_id": event.user_message_id,
        "content": event.content,
        "finish_reason": event.finish_reason,
        "usage": event.usage.as_dict(),
    }


async def first_event(events: AsyncIterator[ChatEvent]) -> ChatEvent:
    """Wait for the first event so that a provider that fails at once yields a 502/504, not a 200."""
    return await anext(events)


async def last_event(first: ChatEvent, events: AsyncIterator[ChatEvent]) -> ChatEvent:
    """Drain a turn that is not streamed to the client; its last event is the outcome."""
    event = first
    async for event in events:  # noqa: B007 - only the last one matters
        pass
    return event


def error_response(error: CompanionError) -> JSONResponse:
    return JSONResponse(error.to_body(), status_code=error.status_code)


@router.post(
    "/{conversation_id}/messages",
    responses={200: {"content": {"text/event-stream": {}}, "description": STREAM_DESCRIPTION}},
)
async def post_message(
    conversation_id: uuid.UUID, body: MessageIn, user_id: UserIdDep, services: ServicesDep
) -> Response:
    """Send a message; the reply streams back (see the response description)."""
    conversation = await services.conversations.get(user_id, conversation_id)
    turn = await services.chat.begin(user_id, conversation, body.content)
    events = services.chat.run(turn)
    first = await first_event(events)
    if isinstance(first, ErrorEvent) and first.message_id is None:
        return error_response(first.error)
    if not body.stream:
        return await _collect(first, events)
    return sse_response(_stream(services, turn, first, events))


async def _collect(first: ChatEvent, events: AsyncIterator[ChatEvent]) -> Response:
    event = await last_event(first, events)
    if isinstance(event, ErrorEvent):
        return error_response(event.error)
    assert isinstance(event, DoneEvent)
    return JSONResponse(done_payload(event))


async def _stream(
    services: Services, turn: Turn, first: ChatEvent, events: AsyncIterator[ChatEvent]
) -> AsyncIterator[bytes]:
    yield sse_event("message", {"user_message_id": turn.user_message.id, "conversation_id": str(turn.conversation.id)})
    event: ChatEvent | None = first
    try:
        while event is not None:
            if isinstance(event, TokenEvent):
                yield sse_event("token", {"text": event.text})
            elif isinstance(event, DoneEvent):
                yield sse_event("done", done_payload(event))
            elif isinstance(event, ErrorEvent):
                yield sse_event("error", {**event.error.to_body(), "message_id": event.message_id})
            event = await anext(events, None)
    finally:
        await events.aclose()  # type: ignore[attr-defined]
