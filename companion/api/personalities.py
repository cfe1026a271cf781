"""Personalities: the eight globals plus the user's own (which shadow globals of the same name)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from companion.api.deps import ServicesDep, UserIdDep
from companion.personalities.schemas import PersonalityCreate, PersonalityOut, PersonalityUpdate

router = APIRouter(prefix="/v1/personalities", tags=["personalities"])


@router.get("", response_model=list[PersonalityOut])
async def list_personalities(user_id: UserIdDep, services: ServicesDep) -> list[PersonalityOut]:
    return await services.personalities.list_visible(user_id)


@router.get("/{name}", response_model=PersonalityOut)
async def get_personality(name: str, user_id: UserIdDep, services: ServicesDep) -> PersonalityOut:
    return await services.personalities.resolve(user_id, name)


@router.post("", status_code=201, response_model=PersonalityOut)
async def create_personality(body: PersonalityCreate, user_id: UserIdDep, services: ServicesDep) -> PersonalityOut:
    return await services.personalities.create(user_id, body)


@router.patch("/{name}", response_model=PersonalityOut)
async def update_personality(
    name: str, body: PersonalityUpdate, user_id: UserIdDep, services: ServicesDep
) -> PersonalityOut:
    """Change one of your own personalities. Global ones cannot be changed; create your own of
    the same name to shadow one."""
    return await services.personalities.update(user_id, name, body)


@router.delete("/{name}", status_code=204)
async def delete_personality(name: str, user_id: UserIdDep, services: ServicesDep) -> Response:
    await services.personalities.delete(user_id, name)
    return Response(status_code=204)
