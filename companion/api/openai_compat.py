"""OpenAI-compatible API: POST /v1/chat/completions and GET /v1/models.

`model` is a personality name and the bearer token is the user's API key. The server keeps the
conversation: only the newest user message of `messages` is taken (earlier ones, and system
messages, are ignored, since the server already has the history). The conversation is the one named
by the `conversation_id` body field or the `X-Conversation-Id` header, else the user's most recent
conversation with that personality, else a new one; the answer names it in `conversation_id` and in
the `X-Conversation-Id` header.

A streamed reply stops when its client disconnects, as OpenAI clients expect (closing the stream is
how they cancel): it is kept `incomplete` with the text generated so far. Without streaming, the
reply is generated to its end. Its run is otherwise the native API's (companion.chat.runs): while it
streams, `POST /v1/conversations/{id}/messages/{message_id}/stop` stops it and `.../stream` follows it.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import anyio
import orjson
from fastapi import APIRouter, Header, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse

from companion.api.admission import hold_for_turn
from companion.api.conversations import error_response, outcome_of, start_run
from companion.api.deps import ServicesDep, UserIdDep
from companion.api.sse import sse_event, sse_response
from companion.chat.runs import Run
from companion.chat.service import DoneEvent, ErrorEvent, Turn
from companion.conversations.schemas import ConversationOut
from companion.errors import CompanionError, InvalidInput
from companion.services import Services

router = APIRouter(prefix="/v1", tags=["openai-compatible"])


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class OpenAIMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    # Clients send many fields we do not use (n, top_p, presence_penalty, ...): accept and ignore.
    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="A personality name, as listed by GET /v1/models.")
    messages: Annotated[list[OpenAIMessage], Field(min_length=1, max_length=1000)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    conversation_id: uuid.UUID | None = Field(
        default=None, description="Continue this conversation (else the latest one with this personality)."
    )


def _completion_id(message_id: int | None) -> str:
    return f"chatcmpl-{message_id}" if message_id is not None else f"chatcmpl-{uuid.uuid4().hex}"


async def _conversation_for(
    services: Services, user_id: uuid.UUID, personality: str, wanted: uuid.UUID | None
) -> tuple[ConversationOut, bool]:
    """The conversation to continue, and whether it was created for this request."""
    if wanted is not None:
        conversation = await services.conversations.get(user_id, wanted)
        if conversation.personality != personality:
            raise InvalidInput(
                f"Conversation {wanted} is with {conversation.personality!r}, not {personality!r}.",
                param="conversation_id",
            )
        return conversation, False
    latest = await services.conversations.latest(user_id, personality)
    if latest is not None:
        return latest, False
    return await services.conversations.create(user_id, personality), True


@router.post("/chat/completions", responses={502: {}, 504: {}})
async def chat_completions(
    body: ChatCompletionRequest,
    user_id: UserIdDep,
    services: ServicesDep,
    request: Request,
    x_conversation_id: Annotated[uuid.UUID | None, Header()] = None,
) -> Response:
    """Chat with a personality through any OpenAI client (stream or not)."""
    personality = await services.personalities.resolve(user_id, body.model)
    newest = body.messages[-1]
    if newest.role != "user":
        raise InvalidInput("The last message must have role 'user'.", param="messages")
    # Check the text before choosing the conversation, which may create one: a rejected request stores nothing.
    content = services.chat.check_message(newest.text())
    # A spent quota must not leave a new, empty conversation behind (the turn checks the same first).
    await services.chat.enforce_quota(user_id, content)
    conversation, created = await _conversation_for(
        services, user_id, personality.name, body.conversation_id or x_conversation_id
    )
    try:
        turn = await services.chat.begin(
            user_id,
            conversation,
            content,
            max_tokens=body.max_completion_tokens or body.max_tokens,
            temperature=body.temperature,
        )
    except BaseException:
        if created:
            # Made for this request, which failed before storing anything in it: leave nothing behind.
            with anyio.CancelScope(shield=True), contextlib.suppress(CompanionError):
                await services.conversations.delete(user_id, conversation.id)
        raise
    turn = hold_for_turn(request, turn)
    run = await start_run(services, turn)
    if isinstance(run, Response):
        return run
    headers = {"X-Conversation-Id": str(conversation.id)}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse_response(_stream(services, run, personality.name, include_usage), headers)
    return await _complete(turn, personality.name, run, headers)


async def _complete(turn: Turn, model: str, run: Run, headers: dict[str, str]) -> Response:
    event = await outcome_of(run)
    if isinstance(event, ErrorEvent):
        return error_response(event.error)
    assert isinstance(event, DoneEvent)
    body = {
        "id": _completion_id(event.message_id),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "conversation_id": str(turn.conversation.id),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": event.content},
                "finish_reason": event.finish_reason,
            }
        ],
        "usage": event.usage.as_dict(),
    }
    return JSONResponse(body, headers=headers)


async def _stream(services: Services, run: Run, model: str, include_usage: bool) -> AsyncIterator[bytes]:
    turn = run.turn
    created = int(time.time())
    completion_id = _completion_id(None)

    def chunk(delta: dict[str, Any] | None, finish_reason: str | None = None, usage: Any = None) -> bytes:
        payload: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "conversation_id": str(turn.conversation.id),
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}] if delta is not None else [],
        }
        if usage is not None:
            payload["usage"] = usage
        return sse_event(None, orjson.dumps(payload))

    assert run.message_id is not None
    finished = False
    try:
        yield chunk({"role": "assistant", "content": ""})
        async for event in services.runs.local.follow(run.message_id, 0, stall_seconds=86_400.0):
            if event.kind == "token":
                yield chunk({"content": event.text})
            elif event.kind == "done":
                data = event.payload()
                yield chunk({}, data["finish_reason"])
                if include_usage:
                    yield chunk(None, usage=data["usage"])
            elif event.kind == "error":
                # OpenAI's own convention for a failure mid-stream; its client raises APIError.
                yield sse_event(None, {"error": event.payload()["error"]})
        finished = True
        yield b"data: [DONE]\n\n"
    finally:
        if not finished:
            services.runs.abandon(run)  # the client hung up: stop generating, as OpenAI does


@router.get("/models")
async def list_models(user_id: UserIdDep, services: ServicesDep) -> dict[str, Any]:
    """Every personality the user can chat with, as OpenAI 'models'."""
    personalities = await services.personalities.list_visible(user_id)
    return {
        "object": "list",
        "data": [
            {
                "id": p.name,
                "object": "model",
                "created": int(p.created_at.timestamp()),
                "owned_by": "companion" if p.scope == "global" else "you",
            }
            for p in personalities
        ],
    }
