"""A user's API keys: list them, create one (shown once), revoke one.

Only an API key manages keys: a session (or the web page's cookie) made from a key must not mint
keys that outlive it. Revoking the last active key is refused (409 `last_api_key`): create the new
one first. A revoked key is refused on every instance at once, and the sessions made from it end.
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field

from companion.api.deps import Principal, PrincipalDep, ServicesDep
from companion.errors import Forbidden, InvalidInput
from companion.users.service import ApiKeyInfo

router = APIRouter(prefix="/v1/api-keys", tags=["api-keys"])


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=100, description="What you call it, e.g. 'laptop'.")]


class ApiKeyOut(ApiKeyInfo):
    current: bool = Field(description="The key this request was made with.")


class CreatedApiKey(BaseModel):
    key: ApiKeyOut
    api_key: str = Field(description="The key itself: shown this once only.")


def _with_key(principal: Principal) -> uuid.UUID:
    if principal.session_id is not None or principal.key_id is None:
        raise Forbidden("API keys are managed with an API key, not a session.", code="api_key_required")
    return principal.key_id


@router.get("", response_model=list[ApiKeyOut])
async def list_api_keys(principal: PrincipalDep, services: ServicesDep) -> list[ApiKeyOut]:
    """Your keys, active and revoked, oldest first (never the keys themselves)."""
    current = _with_key(principal)
    keys = await services.users.list_keys(principal.user_id)
    return [ApiKeyOut(**key.model_dump(), current=key.id == current) for key in keys]


@router.post("", status_code=201, response_model=CreatedApiKey)
async def create_api_key(body: ApiKeyCreate, principal: PrincipalDep, services: ServicesDep) -> CreatedApiKey:
    """A new key for you, shown this once. 409 past API_KEYS_MAX_PER_USER active keys."""
    _with_key(principal)
    try:
        created = await services.users.create_key(principal.user_id, body.name)
    except ValueError as error:
        raise InvalidInput(str(error), param="name") from None
    return CreatedApiKey(key=ApiKeyOut(**created.info.model_dump(), current=False), api_key=created.api_key)


@router.delete("/{key_id}", status_code=204)
async def revoke_api_key(key_id: uuid.UUID, principal: PrincipalDep, services: ServicesDep) -> Response:
    """Revoke one of your keys (this one too, if another stays active). 409 for your last active key."""
    _with_key(principal)
    await services.users.revoke_key(principal.user_id, key_id)
    await services.sessions.revoke_made_with(principal.user_id, key_id)
    return Response(status_code=204)
