"""The user's preferences, which shape every prompt."""

from __future__ import annotations

from fastapi import APIRouter

from companion.api.deps import ServicesDep, UserIdDep
from companion.preferences.schemas import Preferences

router = APIRouter(prefix="/v1/preferences", tags=["preferences"])


@router.get("", response_model=Preferences)
async def get_preferences(user_id: UserIdDep, services: ServicesDep) -> Preferences:
    return await services.preferences.get(user_id)


@router.put("", response_model=Preferences)
async def put_preferences(body: Preferences, user_id: UserIdDep, services: ServicesDep) -> Preferences:
    """Replace all preferences; fields left out go back to their defaults."""
    return await services.preferences.put(user_id, body)
