"""GET /health: overall status and each dependency's state, without secrets."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.responses import JSONResponse

from companion import __version__
from companion.api.deps import ServicesDep
from companion.cache.backend import CacheUnavailable
from companion.errors import ServiceUnavailable
from companion.services import Services

router = APIRouter(tags=["health"])


async def redis_health(services: Services) -> dict[str, Any]:
    if services.redis is None:
        return {"status": "disabled", "cache": "in-process"}
    breaker = services.redis.breaker
    state: dict[str, Any] = {
        "mode": services.redis.topology.mode,
        "circuit": breaker.state,
        "invalidation_channel": "connected"
        if services.listener is not None and services.listener.connected.is_set()
        else "disconnected",
        "pending_invalidations": services.cache.pending_invalidations,
    }
    try:
        state["latency_ms"] = round(await services.redis.ping(), 2)
        # cluster: state, slots covered, nodes reachable; sentinel: the current primary
        state.update(await services.redis.describe())
    except CacheUnavailable:
        return {"status": "down", **state}
    healthy = state["invalidation_channel"] == "connected" and state.get("cluster_state", "ok") == "ok"
    return {"status": "ok" if healthy else "degraded", **state}


@router.get("/health")
async def health(services: ServicesDep) -> JSONResponse:
    """`status` is `ok` when every dependency works and `degraded` otherwise (Redis down: still
    serving from the database). HTTP 503 when the database, the system of record, is down, since
    no request can then succeed; 200 otherwise."""
    checks: dict[str, Any] = {}
    try:
        latency = await services.database.ping()
        checks["database"] = {"status": "ok", "backend": services.database.dialect, "latency_ms": round(latency, 2)}
    except ServiceUnavailable:
        checks["database"] = {"status": "down", "backend": services.database.dialect}
    checks["redis"] = await redis_health(services)
    checks["llm"] = services.provider.health()
    database_ok = checks["database"]["status"] == "ok"
    healthy = database_ok and checks["redis"]["status"] in ("ok", "disabled") and checks["llm"].get("status") == "ok"
    body = {"status": "ok" if healthy else "degraded", "version": __version__, "checks": checks}
    return JSONResponse(body, status_code=200 if database_ok else 503)
