"""The memories the companion keeps about the user: list, search, add, delete one, forget what
came from a conversation or a message, forget all. Deleting is immediate everywhere: the very next
prompt, on any instance, no longer contains it."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from companion.api.deps import ServicesDep, UserIdDep
from companion.errors import InvalidInput
from companion.memory.fulltext import Scope
from companion.memory.store import MemoryOut
from companion.types import NonBlankText

router = APIRouter(prefix="/v1/memories", tags=["memories"])


class MemoryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[MemoryOut]


class MemoryCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: Annotated[NonBlankText, Field(max_length=300, description="A fact to remember, e.g. 'I am vegetarian.'")]


class Deleted(BaseModel):
    deleted: int


def _spaced(value: str) -> str:
    """One space between words: how memories are stored and searched."""
    return " ".join(value.split())


@router.get("", response_model=MemoryList)
async def list_memories(
    user_id: UserIdDep,
    services: ServicesDep,
    query: Annotated[
        NonBlankText | None, Query(max_length=1000, description="Search by meaning, best match first.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    kind: Annotated[
        Scope,
        Query(description="`episodes`: what you said, verbatim; `facts`: facts drawn from it and notes you added."),
    ] = "all",
) -> MemoryList:
    """Newest first; with `query`, the `limit` best matches by meaning and by words, each with its
    `score` (cosine similarity to the query)."""
    if query is not None:
        return MemoryList(data=await services.memories.search(user_id, _spaced(query), limit=limit, scope=kind))
    return MemoryList(data=await services.memories.list(user_id, limit=limit, offset=offset, scope=kind))


@router.post("", status_code=201, response_model=MemoryOut)
async def add_memory(body: MemoryCreate, user_id: UserIdDep, services: ServicesDep) -> MemoryOut:
    """Remember something on purpose. A near-duplicate of a kept memory updates it instead."""
    stored = await services.memories.add(user_id, _spaced(body.text))
    if stored is None:
        raise InvalidInput(
            f"You have reached the maximum of {services.memories.config.max_per_user} memories; delete some first.",
            code="too_many_memories",
        )
    return stored


@router.delete("/{memory_id}", status_code=204)
async def delete_memory(memory_id: uuid.UUID, user_id: UserIdDep, services: ServicesDep) -> Response:
    await services.memories.delete(user_id, memory_id)
    return Response(status_code=204)


@router.delete("", response_model=Deleted)
async def forget(
    user_id: UserIdDep,
    services: ServicesDep,
    conversation_id: Annotated[
        uuid.UUID | None, Query(description="Forget only what came from this conversation.")
    ] = None,
    message_id: Annotated[
        int | None, Query(ge=1, description="Forget only what came from this message.")
    ] = None,
) -> Deleted:
    """Forget everything, or only the episodes and facts that came from one conversation or message."""
    if conversation_id is None and message_id is None:
        return Deleted(deleted=await services.memories.delete_all(user_id))
    return Deleted(
        deleted=await services.memories.forget(user_id, conversation_id=conversation_id, message_id=message_id)
    )
