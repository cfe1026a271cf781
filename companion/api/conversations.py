"""Native chat API: conversations, their messages, and a turn streamed as Server-Sent Events."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Request, Response
from starlette.responses import JSONResponse

from companion.api.admission import hold_for_turn, release_before_streaming
from companion.api.deps import ServicesDep, UserIdDep
from companion.api.sse import sse_event, sse_response
from companion.chat.runs import Run, done_data
from companion.chat.service import DoneEvent, ErrorEvent, Turn
from companion.conversations.schemas import (
    ConversationCreate,
    ConversationOut,
    ConversationPage,
    MessageIn,
    MessageOut,
    MessagePage,
)
from companion.errors import CompanionError, InvalidInput, Overloaded
from companion.runs.events import RunEvent, parse_position
from companion.runs.memory import MemoryRunLog
from companion.services import Services
from companion.types import is_valid_name

router = APIRouter(prefix="/v1/conversations", tags=["conversations"])
# Message ids are 64-bit signed integers on every backend; a bigger cursor must be a 422, not an overflow.
MAX_MESSAGE_ID = 2**63 - 1

STREAM_DESCRIPTION = """The reply streams as Server-Sent Events, each with an `id:`:

* `event: message` once, first (`id: 0`): `{"message_id": int, "user_message_id": int, "conversation_id": str}`,
  the reply's id (to resume or stop it) and the stored user message's;
* `event: token` for each piece of text: `{"text": str}`; its id is the reply's length in characters so far;
* `event: done` last (`id: end`): `{"message_id", "user_message_id", "content", "finish_reason", "usage":
  {"prompt_tokens", "completion_tokens", "total_tokens"}}`; `finish_reason` is `stopped` after a stop request;
* or `event: error` last (`id: end`): `{"error": {...}, "message_id": int}` when the model failed mid-reply
  (the text generated so far is kept, with status `error`) or its server died (`reply_interrupted`).

The reply is generated apart from this request: if the connection drops, it goes on and is stored
`complete`; resume it with `GET .../messages/{message_id}/stream` and `Last-Event-ID`. A provider failure
before the first token answers 502/504 JSON instead of a stream. With `"stream": false` the reply comes back
as one JSON object (the `done` payload)."""

RESUME_DESCRIPTION = """The reply's events after the one named by the `Last-Event-ID` header (or the `after`
query parameter; neither: from the start, `message` event included), then the rest live, to the same final
`done` or `error` event. A reply that already ended is replayed to its end at once. Concatenating the text
received before the cut and the text of this stream gives exactly the stored reply.

Any server resumes any reply when Redis is on; without Redis, the server generating the reply streams it
live and another one follows the database's copy (saved every `STREAM_FLUSH_INTERVAL_SECONDS`)."""


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
async def delete_conversation(
    conversation_id: uuid.UUID,
    user_id: UserIdDep,
    services: ServicesDep,
    forget_memories: Annotated[
        bool, Query(description="Also forget the memories kept from it (episodes and the facts drawn from them).")
    ] = False,
) -> Response:
    if forget_memories:
        await services.conversations.get(user_id, conversation_id)  # 404 before anything is forgotten
        # Before the conversation goes: deleting it sets their conversation_id to NULL.
        await services.memories.forget(user_id, conversation_id=conversation_id)
    await services.conversations.delete(user_id, conversation_id)
    await services.chat.forget_conversation(conversation_id)  # its buffer and summary, everywhere, now
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


def sse_run_event(event: RunEvent) -> bytes:
    return sse_event(event.kind, event.payload(), id=event.id)


def error_response(error: CompanionError) -> JSONResponse:
    # A busy model (its bounded queue full) says when to come back, as every 503 overloaded does.
    headers = {"Retry-After": str(error.retry_after)} if isinstance(error, Overloaded) else None
    return JSONResponse(error.to_body(), status_code=error.status_code, headers=headers)


async def start_run(services: Services, turn: Turn) -> Run | Response:
    """Start the reply's run; a failure before its first token is answered as JSON (502/504/503)."""
    run = await services.runs.start(turn)
    failure = run.started.result()
    if failure is not None:
        return error_response(failure.error)
    return run


async def outcome_of(run: Run) -> DoneEvent | ErrorEvent:
    await run.ended.wait()
    assert run.outcome is not None, "a run that has started always ends with an outcome"
    return run.outcome


@router.post(
    "/{conversation_id}/messages",
    responses={200: {"content": {"text/event-stream": {}}, "description": STREAM_DESCRIPTION}, 502: {}, 504: {}},
)
async def post_message(
    conversation_id: uuid.UUID, body: MessageIn, user_id: UserIdDep, services: ServicesDep, request: Request
) -> Response:
    """Send a message; the reply streams back (see the response description)."""
    conversation = await services.conversations.get(user_id, conversation_id)
    turn = hold_for_turn(request, await services.chat.begin(user_id, conversation, body.content))
    run = await start_run(services, turn)
    if isinstance(run, Response):
        return run
    if not body.stream:
        outcome = await outcome_of(run)
        if isinstance(outcome, ErrorEvent):
            return error_response(outcome.error)
        return JSONResponse(done_data(outcome))
    assert run.message_id is not None
    return sse_response(_stream(services.runs.local, run.message_id, -1))


async def _stream(log: MemoryRunLog, message_id: int, offset: int) -> AsyncIterator[bytes]:
    # Following, not driving: when the client leaves, only this generator ends; the run goes on.
    async for batch in log.follow_batches(message_id, offset, stall_seconds=86_400.0):
        yield b"".join(sse_run_event(event) for event in batch)


@router.get(
    "/{conversation_id}/messages/{message_id}/stream",
    responses={200: {"content": {"text/event-stream": {}}, "description": RESUME_DESCRIPTION}},
)
async def resume_reply(
    conversation_id: uuid.UUID,
    message_id: Annotated[int, Path(ge=1, le=MAX_MESSAGE_ID)],
    user_id: UserIdDep,
    services: ServicesDep,
    request: Request,
    after: Annotated[
        str | None, Query(max_length=20, description="The id of the last event received (as Last-Event-ID).")
    ] = None,
    last_event_id: Annotated[str | None, Header(max_length=20)] = None,
) -> Response:
    """Replay a reply's events after the last one received, then follow it live (see the description)."""
    named = last_event_id if last_event_id is not None else after
    offset = parse_position(named)
    if offset is None:
        raise InvalidInput(
            "Last-Event-ID (or after) must be an event id of this reply's stream: a number, or 'end'.",
            code="invalid_event_id",
            param="after" if last_event_id is None else "Last-Event-ID",
        )
    message = await services.runs.resume(user_id, conversation_id, message_id)
    release_before_streaming(request)
    return sse_response(_resume(services, message, offset))


async def _resume(services: Services, message: MessageOut, offset: int) -> AsyncIterator[bytes]:
    async for event in services.runs.follow(message, offset):
        yield sse_run_event(event)


@router.post("/{conversation_id}/messages/{message_id}/stop", response_model=MessageOut)
async def stop_reply(
    conversation_id: uuid.UUID,
    message_id: Annotated[int, Path(ge=1, le=MAX_MESSAGE_ID)],
    user_id: UserIdDep,
    services: ServicesDep,
) -> MessageOut:
    """Stop a reply that is being generated, on whichever server runs it; the text so far is kept and
    its status becomes `stopped`. Returns the reply as stored (a reply that already ended: unchanged)."""
    return await services.runs.stop(user_id, conversation_id, message_id)
