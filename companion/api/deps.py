"""Typed dependencies shared by the routers: the service container, and the authenticated user
(which also spends the user's rate limit for the route). A user authenticates with a bearer token
(API key or session token) or, on the web page, with the session cookie; a cookie-authenticated
request that changes anything must also carry the session's CSRF token."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer

from companion.api.client_address import client_address
from companion.errors import Forbidden, Unauthorized
from companion.services import Services
from companion.sessions.csrf import CSRF_HEADER, csrf_matches
from companion.sessions.service import TOKEN_PREFIX as SESSION_PREFIX
from companion.sessions.service import SessionInfo
from companion.users.service import Gate

SESSION_COOKIE = "companion_session"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

_bearer = HTTPBearer(
    auto_error=False, description="The API key printed by `companion users create`, or a session token."
)
_cookie = APIKeyCookie(
    name=SESSION_COOKIE,
    auto_error=False,
    description="The web page's session (set by POST /web/session); changes also need the X-CSRF-Token header.",
)


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


def client_ip(request: Request, services: Services) -> str:
    """The address per-IP limits count (see companion/api/client_address.py)."""
    settings = services.settings
    return client_address(
        request.client.host if request.client else None,
        request.headers.get("x-forwarded-for"),
        trust=settings.trust_forwarded_for,
        proxies=settings.trusted_proxies,
    )


@dataclass(frozen=True)
class Principal:
    """Who is calling, and with what: an API key (`session_id` None) or a session made from one."""

    user_id: uuid.UUID
    key_id: uuid.UUID | None
    key_hash: str | None
    session_id: str | None = None


async def _authenticate(
    services: Services, credentials: HTTPAuthorizationCredentials | None, gate: Gate | None
) -> Principal:
    if credentials is None:
        raise Unauthorized("Missing API key: send `Authorization: Bearer <api key>`.", code="missing_api_key")
    token = credentials.credentials
    if token.startswith(SESSION_PREFIX):
        return await session_principal(services, token)
    owner = await services.users.authenticate_key(token, gate=gate)
    return Principal(owner.user_id, owner.key_id, owner.key_hash)


async def live_session(services: Services, token: str) -> tuple[SessionInfo, str | None] | None:
    """The session for `token` if it is valid and the API key it was made from is still active."""
    found = await services.sessions.authenticate_with_key(token)
    if found is None:
        return None
    session, key_hash = found
    if key_hash is not None:
        owner = await services.users.owner_of_hash(key_hash)
        if owner is None or owner.user_id != session.user_id:
            return None  # its key was revoked: the sessions made from it end with it
    return session, key_hash


async def session_principal(services: Services, token: str) -> Principal:
    found = await live_session(services, token)
    if found is None:
        raise Unauthorized("Your session has expired or was revoked; sign in again.", code="invalid_session")
    session, key_hash = found
    return Principal(session.user_id, session.api_key_id, key_hash, session.id)


def require_csrf(request: Request, session_token: str) -> None:
    """403 unless the request carries this session's CSRF token. Browsers attach cookies to requests
    other sites trigger; only a same-origin script can read the token and send it back."""
    if not csrf_matches(session_token, request.headers.get(CSRF_HEADER)):
        raise Forbidden(
            f"Missing or wrong {CSRF_HEADER} header; reload the page and try again.", code="csrf_token_invalid"
        )


async def _authenticate_cookie(services: Services, request: Request, token: str) -> Principal:
    if request.method not in SAFE_METHODS:
        require_csrf(request, token)
    return await session_principal(services, token)


async def current_principal(
    request: Request,
    services: ServicesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    cookie: Annotated[str | None, Depends(_cookie)],
) -> Principal:
    limits = services.rate_limits
    gate: Gate | None = None
    if limits.enabled:
        ip = client_ip(request, services)
        limits.refuse_blocked(ip)  # an address over its failed-authentication limit: before anything

        async def gate() -> None:
            await limits.refuse_over_auth_limit(ip)

    try:
        if credentials is None and cookie:
            principal = await _authenticate_cookie(services, request, cookie)
        else:
            principal = await _authenticate(services, credentials, gate)
    except Unauthorized:
        if limits.enabled:
            await limits.auth_failed(client_ip(request, services))  # 429 once an address fails too often
        raise
    if limits.enabled:
        route = request.scope.get("route")
        template = getattr(route, "path", request.url.path)
        decision = await limits.check_user(str(principal.user_id), f"{request.method} {template}")
        request.state.rate_limit = decision  # RateLimit headers on the way out (api/ratelimit.py)
    return principal


async def current_user(principal: Annotated[Principal, Depends(current_principal)]) -> uuid.UUID:
    return principal.user_id


PrincipalDep = Annotated[Principal, Depends(current_principal)]
UserIdDep = Annotated[uuid.UUID, Depends(current_user)]
