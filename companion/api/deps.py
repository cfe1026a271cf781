"""Typed dependencies shared by the routers: the service container, and the authenticated user
(which also spends the user's rate limit for the route). A user authenticates with a bearer token
(API key or session token) or, on the web page, with the session cookie; a cookie-authenticated
request that changes anything must also carry the session's CSRF token."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer

from companion.errors import Forbidden, Unauthorized
from companion.services import Services
from companion.sessions.csrf import CSRF_HEADER, csrf_matches
from companion.sessions.service import TOKEN_PREFIX as SESSION_PREFIX

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
    """The address per-IP limits count. Behind a trusted proxy, the last `X-Forwarded-For` entry:
    the one that proxy appended. Earlier entries come from the client and may be forged (taking the
    first would let anyone pick a fresh address, and a fresh budget, for every request)."""
    if services.settings.trust_forwarded_for:
        forwarded = request.headers.get("x-forwarded-for", "")
        last = forwarded.rsplit(",", 1)[-1].strip()
        if last:
            return last[:64]
    return request.client.host if request.client else "unknown"


async def _authenticate(services: Services, credentials: HTTPAuthorizationCredentials | None) -> uuid.UUID:
    if credentials is None:
        raise Unauthorized("Missing API key: send `Authorization: Bearer <api key>`.", code="missing_api_key")
    token = credentials.credentials
    if token.startswith(SESSION_PREFIX):
        return await _session_user(services, token)
    return await services.users.authenticate(token)


async def _session_user(services: Services, token: str) -> uuid.UUID:
    session = await services.sessions.authenticate(token)
    if session is None:
        raise Unauthorized("Your session has expired or was revoked; sign in again.", code="invalid_session")
    return session.user_id


def require_csrf(request: Request, session_token: str) -> None:
    """403 unless the request carries this session's CSRF token. Browsers attach cookies to requests
    other sites trigger; only a same-origin script can read the token and send it back."""
    if not csrf_matches(session_token, request.headers.get(CSRF_HEADER)):
        raise Forbidden(
            f"Missing or wrong {CSRF_HEADER} header; reload the page and try again.", code="csrf_token_invalid"
        )


async def _authenticate_cookie(services: Services, request: Request, token: str) -> uuid.UUID:
    if request.method not in SAFE_METHODS:
        require_csrf(request, token)
    return await _session_user(services, token)


async def current_user(
    request: Request,
    services: ServicesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    cookie: Annotated[str | None, Depends(_cookie)],
) -> uuid.UUID:
    limits = services.rate_limits
    try:
        if credentials is None and cookie:
            user_id = await _authenticate_cookie(services, request, cookie)
        else:
            user_id = await _authenticate(services, credentials)
    except Unauthorized:
        if limits.enabled:
            await limits.auth_failed(client_ip(request, services))  # 429 once an address fails too often
        raise
    if limits.enabled:
        route = request.scope.get("route")
        template = getattr(route, "path", request.url.path)
        decision = await limits.check_user(str(user_id), f"{request.method} {template}")
        request.state.rate_limit = decision  # RateLimit headers on the way out (api/ratelimit.py)
    return user_id


UserIdDep = Annotated[uuid.UUID, Depends(current_user)]
