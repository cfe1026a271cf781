"""GET /health: overall status and each dependency's state, without secrets."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.responses import JSONResponse

from companion import __version__
from companion.api.deps import ServicesDep
from companion.cache.backend import CacheUnavailable
from companion.errors import Overloaded, ServiceUnavailable
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


def load_health(services: Services) -> dict[str, Any]:
    """This worker's own load: admission gates and the event loop's recent worst lateness."""
    load: dict[str, Any] = {}
    if services.admission is not None:
        for name, gate in services.admission.gates().items():
            load[name] = {"in_flight": gate.in_flight, "limit": gate.limit, "waiting": gate.waiting}
    if services.loop is not None:
        load["event_loop_lag_ms"] = round(services.loop.max_lag() * 1000, 1)
    return load


@router.get("/health")
async def health(services: ServicesDep) -> JSONResponse:
    """`status` is `ok` when every dependency works and `degraded` otherwise (Redis down: still
    serving from the database). HTTP 503 when the database, the system of record, is down, since
    no request can then succeed; 200 otherwise.

    A dependency is `down` only on evidence (a failed connect or query, no answer while our event
    loop was free to read it): a busy worker reports the database `busy` (every pooled connection
    in use) and its own load under `load`, never a dependency outage."""
    checks: dict[str, Any] = {}
    try:
        latency = await services.database.ping()
        checks["database"] = {"status": "ok", "backend": services.database.dialect, "latency_ms": round(latency, 2)}
    except Overloaded:
        checks["database"] = {"status": "busy", "backend": services.database.dialect}
    except ServiceUnavailable:
        checks["database"] = {"status": "down", "backend": services.database.dialect}
    checks["redis"] = await redis_health(services)
    checks["llm"] = services.provider.health()
    checks["load"] = load_health(services)
    database_ok = checks["database"]["status"] in ("ok", "busy")
    healthy = database_ok and checks["redis"]["status"] in ("ok", "disabled") and checks["llm"].get("status") == "ok"
    body = {"status": "ok" if healthy else "degraded", "version": __version__, "checks": checks}
    return JSONResponse(body, status_code=200 if database_ok else 503)
