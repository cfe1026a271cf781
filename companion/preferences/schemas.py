"""The user's preferences: a small validated object that shapes every prompt."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from companion.types import Line, NonBlankLine


class Preferences(BaseModel):
    # Frozen: cached instances are shared between requests.
    model_config = ConfigDict(extra="forbid", frozen=True)

    preferred_name: Annotated[NonBlankLine, Field(max_length=64)] | None = Field(
        default=None, description="How the companion addresses the user."
    )
    reply_length: Literal["short", "medium", "long"] = "medium"
    language: Annotated[NonBlankLine, Field(max_length=40)] | None = Field(
        default=None, description="Language to reply in, e.g. 'English' or 'pt-BR'."
    )
    tone: Literal["casual", "neutral", "formal"] = "neutral"
    interests: Annotated[tuple[Annotated[Line, Field(min_length=1, max_length=64)], ...], Field(max_length=20)] = ()
    memory_enabled: bool = Field(default=True, description="Whether the companion may keep long-term memories.")
