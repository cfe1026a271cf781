"""Admission control at the edge (see `companion.overload.admission`): a chat turn takes a slot of
the turn gate, any other request one of the request gate, before routing, authentication or any
storage; past the queue the request gets 503 `overloaded` with Retry-After in the one error shape.

A turn's slot is held until its reply has been generated and saved, not merely until its response
ends: the route hands the permit to the turn (`turn_permit`), which releases it when it is done,
whether or not the client is still connected. Health checks and metrics are never gated."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from companion.chat.service import Turn
from companion.errors import Overloaded
from companion.overload.admission import Gate, Permit

UNGATED = ("/health", "/metrics")
# The routes that start a chat turn (a model generation): a message, a regenerated reply or an
# edited message (companion.api.branches), and OpenAI's chat completions.
_TURN_ROUTES = re.compile(r"^/v1/(conversations/[^/]+/messages(/[^/]+/(regenerate|edit))?|chat/completions)/?$")
_PERMIT = "admission_permit"


def is_turn(method: str, path: str) -> bool:
    return method == "POST" and _TURN_ROUTES.match(path) is not None


def overloaded_response(error: Overloaded) -> JSONResponse:
    return JSONResponse(error.to_body(), status_code=error.status_code, headers={"Retry-After": str(error.retry_after)})


def turn_permit(request: Request) -> Callable[[], None] | None:
    """For a route that manages its own slot: take over the release of the request's slot (a turn
    releases it once finished); None when admission control did not gate this request."""
    permit: Permit | None = request.scope.get("state", {}).get(_PERMIT)
    if permit is None:
        return None
    return permit.hand_over()


def release_before_streaming(request: Request) -> None:
    """For a route that only follows a stream (a resumed reply): its set-up was admitted, but the
    following itself is waiting, not work, and must not hold a slot for as long as the reply lasts."""
    release = turn_permit(request)
    if release is not None:
        release()


def hold_for_turn(request: Request, turn: Turn) -> Turn:
    """The turn keeps the request's slot until it has finished (its `release`), not merely until the
    response has been sent: a reply that runs on after its client left still counts."""
    release_slot = turn_permit(request)
    if release_slot is None:
        return turn
    release_turn = turn.release

    async def release() -> None:
        try:
            await release_turn()
        finally:
            release_slot()

    return dataclasses.replace(turn, release=release)


class AdmissionMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        services = getattr(scope["app"].state, "services", None)
        if services is None or path in UNGATED:
            await self.app(scope, receive, send)
            return
        admission = services.admission
        gate: Gate = admission.turns if is_turn(scope["method"], path) else admission.requests
        try:
            permit = await gate.acquire()
        except Overloaded as error:
            await overloaded_response(error)(scope, receive, send)
            return
        scope.setdefault("state", {})[_PERMIT] = permit
        try:
            await self.app(scope, receive, send)
        finally:
            if not permit.handed_over:
                permit.release()
