"""GET /health: overall status and each dependency's state, without secrets."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.responses import JSONResponse

from companion import __version__
from companion.api.deps import ServicesDep
from companion.errors import ServiceUnavailable

router = APIRouter(tags=["health"])


@router.get("/health")
async def health(services: ServicesDep) -> JSONResponse:
    """`status` is `ok` when every dependency works and `degraded` otherwise. HTTP 503 when the
    database (the system of record) is down, since no request can then succeed; 200 otherwise."""
    checks: dict[str, Any] = {}
    try:
        latency = await services.database.ping()
        checks["database"] = {
            "status": "ok",
            "backend": services.database.dialect,
            "latency_ms": round(latency, 2),
        }
    except ServiceUnavailable:
        checks["database"] = {"status": "down", "backend": services.database.dialect}
    checks["redis"] = {"status": "disabled"}
    checks["llm"] = services.provider.health()
    database_ok = checks["database"]["status"] == "ok"
    status = "ok" if database_ok and checks["llm"].get("status") == "ok" else "degraded"
    body = {"status": status, "version": __version__, "checks": checks}
    return JSONResponse(body, status_code=200 if database_ok else 503)
