"""Server-side sessions (for the web page): create one, list yours, revoke one."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Path, Response
from pydantic import BaseModel

from companion.api.deps import PrincipalDep, ServicesDep, UserIdDep
from companion.sessions.service import SessionInfo

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])


class CreatedSession(BaseModel):
    session: SessionInfo
    token: str
    expires_in: int


@router.post("", status_code=201, response_model=CreatedSession)
async def create_session(
    principal: PrincipalDep, services: ServicesDep, user_agent: Annotated[str | None, Header()] = None
) -> CreatedSession:
    """Start a session; its token is shown once. It expires after SESSION_TTL_SECONDS of inactivity,
    and ends when the API key it was made from (directly or through another session) is revoked.
    409 past SESSIONS_MAX_PER_USER."""
    token, info = await services.sessions.create(
        principal.user_id, user_agent=user_agent, api_key_id=principal.key_id, key_hash=principal.key_hash
    )
    return CreatedSession(session=info, token=token, expires_in=int(services.sessions.ttl_seconds))


@router.get("", response_model=list[SessionInfo])
async def list_sessions(user_id: UserIdDep, services: ServicesDep) -> list[SessionInfo]:
    return await services.sessions.list(user_id)


@router.delete("/{session_id}", status_code=204)
async def revoke_session(
    session_id: Annotated[str, Path(pattern=r"^[0-9a-f]{16}$")], user_id: UserIdDep, services: ServicesDep
) -> Response:
    """End a session. 503 `session_revocation_deferred` when the session store is unreachable: the
    session is refused here at once and revoked everywhere when the store is back; retry to confirm."""
    await services.sessions.revoke(user_id, session_id)
    return Response(status_code=204)
