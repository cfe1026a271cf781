"""Rate limiting at the edge: RateLimit headers on every limited response, and the per-IP limit on
unauthenticated routes (health checks and metrics are exempt: monitors must always get through)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from companion.errors import ServiceUnavailable
from companion.ratelimit.policy import RateLimited, rate_limit_headers

EXEMPT = ("/health", "/metrics")


def _limited_by_address(path: str) -> bool:
    """Unauthenticated routes: everything but /v1 (limited per user, and per address on failed
    authentication) and the exempt paths themselves (not whatever merely starts like them)."""
    if path.startswith("/v1/"):
        return False
    return not any(path == exempt or path.startswith(exempt + "/") for exempt in EXEMPT)


class RateLimitMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        services = scope["app"].state.services if hasattr(scope["app"].state, "services") else None
        path: str = scope.get("path", "")
        if services is not None and services.rate_limits.enabled and _limited_by_address(path):
            from companion.api.deps import client_ip

            try:
                decision = await services.rate_limits.check_ip(client_ip(Request(scope), services))
            except RateLimited as error:
                response = JSONResponse(error.to_body(), status_code=429, headers=error.headers())
                await response(scope, receive, send)
                return
            except ServiceUnavailable as error:
                # RATE_LIMIT_FAIL_CLOSED with Redis unreachable. Raised here, outside the routers,
                # the app's error handlers would never see it (it would end as a 500).
                response = JSONResponse(error.to_body(), status_code=503, headers={"Retry-After": "5"})
                await response(scope, receive, send)
                return
            scope.setdefault("state", {})["rate_limit"] = decision

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                decision = scope.get("state", {}).get("rate_limit")
                if decision is not None:
                    headers = list(message.get("headers", []))
                    existing = {name.lower() for name, _ in headers}
                    for name, value in rate_limit_headers(decision).items():
                        if name.lower().encode() not in existing:
                            headers.append((name.encode(), value.encode()))
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
