"""The application factory: `create_app(settings)` wires routers and error handling; the lifespan
builds every backend and disposes of them. Nothing is built at import time."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from companion import __version__
from companion.api import (
    admission,
    api_keys,
    branches,
    conversations,
    health,
    interchange,
    memories,
    metrics,
    openai_compat,
    openapi,
    personalities,
    preferences,
    sessions,
)
from companion.api.errors import BodySizeLimit, install_error_handlers
from companion.api.ratelimit import RateLimitMiddleware
from companion.config import Settings, load_settings
from companion.llm.base import LLMProvider
from companion.services import Services
from companion.types import Clock, utcnow
from companion.web import routes as web


def create_app(
    settings: Settings | None = None, *, provider: LLMProvider | None = None, clock: Clock = utcnow
) -> FastAPI:
    """Build the app. Tests pass a `provider` (e.g. ScriptedProvider) and a `clock`."""
    settings = settings or load_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = Services.build(settings, provider=provider, clock=clock)
        try:
            await services.start()
            app.state.services = services
            app.state.metrics_registry = metrics.build_registry(services)
            yield
        finally:
            await services.aclose()

    app = FastAPI(
        title="companion",
        version=__version__,
        description="An AI-companion chat service: personalities, streamed replies, memory. "
        "Authenticate with `Authorization: Bearer <api key>`.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes, larger=interchange.UPLOAD_LIMITS)
    app.add_middleware(RateLimitMiddleware)
    app.add_middleware(admission.AdmissionMiddleware)  # outermost: a busy worker refuses before any work
    # interchange and branches before conversations: /v1/conversations/export is not a conversation id.
    for module in (
        health,
        metrics,
        interchange,
        branches,
        personalities,
        preferences,
        conversations,
        memories,
        sessions,
        api_keys,
        openai_compat,
    ):
        app.include_router(module.router)
    web.install(app)  # the chat page at /
    openapi.install(app)  # every route's error statuses documented, whoever added it
    logging.getLogger("companion").setLevel(settings.log_level)
    return app


def create_app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory companion.app:create_app_from_env` (several workers)."""
    return create_app()
