"""Request and response shapes for personalities."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from companion.interchange.cards import CharacterCard
from companion.types import NonBlankLine, NonBlankText, PersonalityName


class PersonalityCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: PersonalityName
    display_name: Annotated[NonBlankLine, Field(max_length=80)] | None = None
    description: Annotated[NonBlankLine, Field(max_length=500)]
    system_prompt: Annotated[NonBlankText, Field(max_length=4000)]


class PersonalityUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    display_name: Annotated[NonBlankLine, Field(max_length=80)] | None = None
    description: Annotated[NonBlankLine, Field(max_length=500)] | None = None
    system_prompt: Annotated[NonBlankText, Field(max_length=4000)] | None = None


class PersonalityOut(BaseModel):
    """A personality as one user sees it: their own, or a global one they have not shadowed."""

    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    display_name: str
    description: str
    system_prompt: str
    scope: Literal["global", "user"]
    version: int
    created_at: datetime
    updated_at: datetime
    card: CharacterCard | None = Field(
        default=None, description="The character card it was imported from (POST /v1/personalities/import)."
    )
