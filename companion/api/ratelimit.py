"""Rate limiting at the edge: RateLimit headers on every limited response, and the per-IP limit on
unauthenticated routes (health checks and metrics are exempt: monitors must always get through)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from companion.ratelimit.policy import RateLimited, rate_limit_headers

EXEMPT = ("/health", "/metrics")


class RateLimitMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        services = scope["app"].state.services if hasattr(scope["app"].state, "services") else None
        path: str = scope.get("path", "")
        if services is not None and services.rate_limits.enabled and not path.startswith(("/v1/", *EXEMPT)):
            from companion.api.deps import client_ip

            try:
                decision = await services.rate_limits.check_ip(client_ip(Request(scope), services))
            except RateLimited as error:
                response = JSONResponse(error.to_body(), status_code=429, headers=error.headers())
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
