"""Typed dependencies shared by the routers: the service container and the authenticated user."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from companion.errors import Unauthorized
from companion.services import Services
from companion.sessions.service import TOKEN_PREFIX as SESSION_PREFIX

_bearer = HTTPBearer(
    auto_error=False, description="The API key printed by `companion users create`, or a session token."
)


def get_services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


ServicesDep = Annotated[Services, Depends(get_services)]


async def current_user(
    services: ServicesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> uuid.UUID:
    if credentials is None:
        raise Unauthorized("Missing API key: send `Authorization: Bearer <api key>`.", code="missing_api_key")
    token = credentials.credentials
    if token.startswith(SESSION_PREFIX):
        session = await services.sessions.authenticate(token)
        if session is None:
            raise Unauthorized("Your session has expired or was revoked; sign in again.", code="invalid_session")
        return session.user_id
    return await services.users.authenticate(token)


UserIdDep = Annotated[uuid.UUID, Depends(current_user)]
