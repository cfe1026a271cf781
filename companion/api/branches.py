"""Regenerate, edit and switch: a conversation is a tree of messages with one active path.

Regenerating answers a user message again (the earlier replies stay as alternatives, the "swipe"
of companion front-ends); editing a user message starts a new branch from its parent with its own
reply; activating a message makes the branch through it the active one. Both new replies stream
exactly as a normal turn does (POST /v1/conversations/{id}/messages)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse

from companion.api.admission import hold_for_turn
from companion.api.conversations import (
    MAX_MESSAGE_ID,
    STREAM_DESCRIPTION,
    _stream,
    error_response,
    outcome_of,
    start_run,
)
from companion.api.deps import ServicesDep, UserIdDep
from companion.api.sse import sse_response
from companion.chat.runs import done_data
from companion.chat.service import ErrorEvent, Turn
from companion.conversations.schemas import MessageIn
from companion.errors import InvalidInput
from companion.services import Services

router = APIRouter(prefix="/v1/conversations", tags=["conversations"])
# Message ids are 64-bit on every backend: a bigger one is a 422, never an overflow in the database.
MessageId = Annotated[int, Path(ge=1, le=MAX_MESSAGE_ID)]
STREAMED: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": STREAM_DESCRIPTION}
}


class RegenerateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stream: bool = Field(default=True, description="Stream the reply as Server-Sent Events (default) or return JSON.")


class ActiveOut(BaseModel):
    head_id: int = Field(description="The newest message of the now active path.")


async def _respond(services: Services, request: Request, turn: Turn, stream: bool) -> Response:
    """Run the turn as a reply run, exactly as POST .../messages does: resumable and stoppable."""
    run = await start_run(services, hold_for_turn(request, turn))
    if isinstance(run, Response):
        return run
    if not stream:
        outcome = await outcome_of(run)
        if isinstance(outcome, ErrorEvent):
            return error_response(outcome.error)
        return JSONResponse(done_data(outcome))
    assert run.message_id is not None
    return sse_response(_stream(services.runs.local, run.message_id, -1))


@router.post("/{conversation_id}/messages/{message_id}/regenerate", responses=STREAMED)
async def regenerate(
    conversation_id: uuid.UUID,
    message_id: MessageId,
    user_id: UserIdDep,
    services: ServicesDep,
    request: Request,
    body: RegenerateIn | None = None,
) -> Response:
    """Another reply to the user message `message_id` (or to the one the reply `message_id`
    answers). The earlier replies stay as alternatives (see `siblings` in the messages list); the
    new one is active and is what later prompts see."""
    conversation = await services.conversations.get(user_id, conversation_id)
    turn = await services.chat.regenerate(user_id, conversation, message_id)
    return await _respond(services, request, turn, body.stream if body else True)


@router.post("/{conversation_id}/messages/{message_id}/edit", responses=STREAMED)
async def edit(
    conversation_id: uuid.UUID,
    message_id: MessageId,
    body: MessageIn,
    user_id: UserIdDep,
    services: ServicesDep,
    request: Request,
) -> Response:
    """Send an edited version of your message `message_id`: it starts a new branch from the same
    point, with its own reply. The old branch stays; switch back with .../activate."""
    conversation = await services.conversations.get(user_id, conversation_id)
    edited = await services.conversations.owned_message(user_id, conversation_id, message_id)
    if edited.role != "user":
        raise InvalidInput("Only your own messages can be edited.", code="cannot_edit", param="message_id")
    turn = await services.chat.begin(user_id, conversation, body.content, parent_id=edited.parent_id)
    return await _respond(services, request, turn, body.stream)


@router.post("/{conversation_id}/messages/{message_id}/activate", response_model=ActiveOut)
async def activate(
    conversation_id: uuid.UUID, message_id: MessageId, user_id: UserIdDep, services: ServicesDep
) -> ActiveOut:
    """Switch to the branch through `message_id` (an alternative reply, or an earlier version of an
    edited message): the active path now goes through it, down to its newest reply."""
    conversation = await services.conversations.get(user_id, conversation_id)
    return ActiveOut(head_id=await services.chat.switch(user_id, conversation, message_id))
