"""Turn every failure into the one JSON error shape (see `companion.errors`), never a traceback,
and cap request bodies before they are read."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from companion.errors import CompanionError, Overloaded, ServiceUnavailable, error_body
from companion.ratelimit.policy import RateLimited
from companion.storage.database import UNAVAILABLE_ERRORS

logger = logging.getLogger(__name__)


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


def _describe_validation(error: RequestValidationError) -> tuple[str, str | None]:
    problems = []
    first_param: str | None = None
    for item in error.errors():
        loc = [str(p) for p in item.get("loc", ()) if p not in ("body", "query", "path", "header")]
        where = ".".join(loc)
        if item.get("type") == "json_invalid":
            problems.append("the body is not valid JSON")
            continue
        first_param = first_param or where or None
        message = str(item.get("msg", "is invalid"))
        problems.append(f"{where}: {message}" if where else message)
    return "; ".join(problems) or "The request is invalid.", first_param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(CompanionError)
    async def _companion(_: Request, error: CompanionError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if error.status_code == 401 else None
        if error.status_code == 503:
            headers = {"Retry-After": str(error.retry_after if isinstance(error, Overloaded) else 5)}
        if isinstance(error, RateLimited):
            headers = error.headers()
        return _json(error.status_code, error.to_body(), headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, error: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation(error)
        return _json(422, error_body(message, "invalid_request_error", "invalid_input", param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        headers = dict(error.headers or {})
        if error.status_code == 405:
            headers["Allow"] = _allowed_methods(request)
        return _json(
            error.status_code,
            error_body(str(error.detail), "invalid_request_error", code),
            headers or None,
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception) -> JSONResponse:
        if isinstance(error, PoolTimeout):
            # A pooled connection did not come free in time outside Database.session: busy, not down.
            busy = Overloaded("The server is busy right now; retry in a moment.", retry_after=1)
            return _json(503, busy.to_body(), {"Retry-After": str(busy.retry_after)})
        if isinstance(error, UNAVAILABLE_ERRORS):
            unavailable = ServiceUnavailable("The database is unavailable right now; retry in a few seconds.")
            return _json(503, unavailable.to_body(), {"Retry-After": "5"})
        logger.exception("unhandled error")
        return _json(500, error_body("Something went wrong on our side.", "server_error", "internal_error"))


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path (Starlette's own 405 names only the first route's).
    Asked of the router as a request would (routes may be wrapped by included routers)."""
    allowed = []
    for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return ", ".join(allowed)


class BodySizeLimit:
    """Reject bodies over `max_bytes` with 413, by Content-Length or while streaming in. File
    uploads (`larger`: path -> limit) have their own, larger limits."""

    def __init__(self, app: ASGIApp, max_bytes: int, larger: dict[str, int] | None = None) -> None:
        self.app = app
        self.default_max_bytes = max_bytes
        self.larger = larger or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await _Limited(self.app, self.larger.get(scope.get("path", ""), self.default_max_bytes))(scope, receive, send)


class _Limited:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    await self._reject(scope, receive, send)
                    return
        received = 0
        too_large = False
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    too_large = True
                    raise _TooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            # The framework may catch _TooLarge itself (FastAPI turns any body-reading failure into
            # a 400); whatever it answers to a body it could not read is replaced by our 413.
            if too_large and not response_started:
                return
            response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _TooLarge:
            pass
        if too_large and not response_started:
            await self._reject(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = error_body(
            f"The request body is larger than {self.max_bytes} bytes.",
            "invalid_request_error",
            "body_too_large",
        )
        await _json(413, body)(scope, receive, send)


class _TooLarge(Exception):
    pass
