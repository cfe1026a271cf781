"""Request and response shapes for conversations and messages."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from companion.types import NonBlankLine, NonBlankText, PersonalityName

MessageStatus = Literal["complete", "streaming", "stopped", "incomplete", "error"]


class ConversationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    personality: PersonalityName
    title: Annotated[NonBlankLine, Field(max_length=200)] | None = None


class ConversationOut(BaseModel):
    id: uuid.UUID
    personality: str
    title: str | None
    created_at: datetime
    updated_at: datetime


class ConversationPage(BaseModel):
    data: list[ConversationOut]
    has_more: bool


class MessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    content: NonBlankText = Field(description="The user's message; limited to MAX_MESSAGE_CHARS characters.")
    stream: bool = Field(default=True, description="Stream the reply as Server-Sent Events (default) or return JSON.")


class MessageOut(BaseModel):
    id: int
    conversation_id: uuid.UUID
    role: Literal["user", "assistant"]
    content: str
    status: MessageStatus
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    created_at: datetime
    parent_id: int | None = Field(default=None, description="The message this one follows (None: the first).")
    siblings: list[int] | None = Field(
        default=None,
        description="On the active path: the ids of this message and its alternatives (regenerated replies, "
        "edited messages), oldest first; switch with POST .../messages/{id}/activate.",
    )


class MessagePage(BaseModel):
    data: list[MessageOut] = Field(description="Messages in chronological order.")
    has_more: bool = Field(description="Whether older (with `before`) or newer (with `after`) messages remain.")
