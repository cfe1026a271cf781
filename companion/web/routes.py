"""Serve the page and its files with a strict Content-Security-Policy, and trade an API key for a
server-side session held in an HttpOnly cookie (plus the CSRF token the page sends with changes)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Cookie, FastAPI, Header, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from companion.api.deps import SESSION_COOKIE, ServicesDep, client_ip, live_session, require_csrf
from companion.errors import Forbidden, Unauthorized
from companion.services import Services
from companion.sessions.csrf import CSRF_HEADER, csrf_token
from companion.sessions.service import RevocationDeferred

STATIC_DIR = Path(__file__).parent / "static"
# Everything the page loads comes from this origin; no inline script or style, no framing.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-cache",
}

router = APIRouter(tags=["web"])


class SignIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_key: str = Field(min_length=1, max_length=200, description="The key `companion users create` printed.")


class WebSession(BaseModel):
    user_id: uuid.UUID
    session_id: str
    csrf_token: str = Field(description=f"Send it back in the {CSRF_HEADER} header with every change.")
    expires_in: int = Field(description="Seconds of inactivity before the session expires.")


class _StaticFiles(StaticFiles):
    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(SECURITY_HEADERS)
        return response


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/static", _StaticFiles(directory=STATIC_DIR), name="static")


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=SECURITY_HEADERS)


def _set_cookie(response: Response, services: Services, token: str) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=int(services.sessions.ttl_seconds),
        path="/",
        httponly=True,
        samesite="strict",
        secure=services.settings.session_cookie_secure,
    )


def _signed_in(response: Response, services: Services, token: str, user_id: uuid.UUID, session_id: str) -> WebSession:
    """Set (or renew) the session cookie; the page's view of its session, with the CSRF token."""
    _set_cookie(response, services, token)
    return WebSession(
        user_id=user_id,
        session_id=session_id,
        csrf_token=csrf_token(token),
        expires_in=int(services.sessions.ttl_seconds),
    )


def _clear_cookie(response: Response, services: Services) -> None:
    response.delete_cookie(
        SESSION_COOKIE, path="/", httponly=True, samesite="strict", secure=services.settings.session_cookie_secure
    )


def _check_origin(request: Request) -> None:
    """Refuse a sign-in posted by another site (login CSRF). Browsers send `Origin` with every
    POST; other clients send none. Behind a proxy, it must pass the original Host through."""
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
        raise Forbidden("Sign in from the page this server serves.", code="cross_origin")


@router.post("/web/session", response_model=WebSession)
async def sign_in(
    body: SignIn,
    request: Request,
    response: Response,
    services: ServicesDep,
    user_agent: Annotated[str | None, Header()] = None,
) -> WebSession:
    """Sign the page in: start a server-side session for the API key's user and put its token in an
    HttpOnly cookie. The answer carries the CSRF token for later changes."""
    _check_origin(request)
    limits = services.rate_limits
    ip = client_ip(request, services)
    if limits.enabled:
        limits.refuse_blocked(ip)
    try:
        owner = await services.users.authenticate_key(
            body.api_key.strip(), gate=(lambda: limits.refuse_over_auth_limit(ip)) if limits.enabled else None
        )
    except Unauthorized:
        if limits.enabled:
            await limits.auth_failed(ip)
        raise
    token, info = await services.sessions.create(
        owner.user_id, user_agent=user_agent, api_key_id=owner.key_id, key_hash=owner.key_hash
    )
    return _signed_in(response, services, token, owner.user_id, info.id)


@router.get("/web/session", response_model=WebSession)
async def current_session(
    response: Response,
    services: ServicesDep,
    token: Annotated[str | None, Cookie(alias=SESSION_COOKIE)] = None,
) -> WebSession:
    """The page's session, if its cookie is still good (401 otherwise); renews the cookie."""
    found = await live_session(services, token) if token else None
    if token is None or found is None:
        raise Unauthorized("You are not signed in.", code="invalid_session")
    session = found[0]
    return _signed_in(response, services, token, session.user_id, session.id)


@router.post("/web/signout", status_code=204)
async def sign_out(
    request: Request,
    services: ServicesDep,
    token: Annotated[str | None, Cookie(alias=SESSION_COOKIE)] = None,
) -> Response:
    """Revoke the page's session on the server and drop its cookie. 503
    `session_revocation_deferred` (cookie dropped all the same) when the session store is unreachable:
    the session is refused here at once and revoked everywhere when the store is back."""
    deferred: RevocationDeferred | None = None
    if token:
        require_csrf(request, token)
        try:
            await services.sessions.sign_out(token)
        except RevocationDeferred as error:
            deferred = error
    if deferred is not None:
        response: Response = JSONResponse(deferred.to_body(), status_code=503, headers={"Retry-After": "5"})
    else:
        response = Response(status_code=204)
    _clear_cookie(response, services)
    return response
