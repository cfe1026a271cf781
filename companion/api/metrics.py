"""GET /metrics: Prometheus text format. Each app has its own registry (no global state), holding
the cache counters, the Redis degradation state and the rate limiter's decisions."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from companion.overload.admission import WAIT_BUCKETS
from companion.services import Services

router = APIRouter(tags=["health"])


class _DegradedCollector(Collector):
    def __init__(self, services: Services) -> None:
        self._services = services

    def collect(self) -> Iterator[GaugeMetricFamily]:
        redis = self._services.redis
        degraded = GaugeMetricFamily(
            "companion_redis_degraded", "1 while Redis is enabled but unusable (serving from the database)"
        )
        circuit_open = redis is not None and redis.breaker.state != "closed"
        listener = self._services.listener
        channel_down = listener is not None and not listener.connected.is_set()
        degraded.add_metric([], 1.0 if (circuit_open or channel_down) else 0.0)
        yield degraded
        outages = GaugeMetricFamily("companion_redis_outages", "Times the Redis circuit breaker opened")
        outages.add_metric([], float(redis.breaker.outages if redis else 0))
        yield outages
        pending = GaugeMetricFamily("companion_cache_pending_invalidations", "Invalidations waiting for Redis")
        pending.add_metric([], float(self._services.cache.pending_invalidations))
        yield pending


class _RateLimitCollector(Collector):
    """The rate limiter's decisions on this instance, per policy (`user`, `ip`, `auth-failures`, or
    an overridden route such as `POST /v1/chat/completions`), from `services.rate_limits.counts`."""

    def __init__(self, services: Services) -> None:
        self._services = services

    def collect(self) -> Iterator[CounterMetricFamily]:
        counts = self._services.rate_limits.counts
        allowed = CounterMetricFamily(
            "companion_ratelimit_allowed", "Requests the rate limiter admitted, per policy", labels=["policy"]
        )
        for policy, value in sorted(counts.allowed.items()):
            allowed.add_metric([policy], float(value))
        yield allowed
        limited = CounterMetricFamily(
            "companion_ratelimit_limited",
            "Requests refused with 429 by the rate limiter, per policy",
            labels=["policy"],
        )
        for policy, value in sorted(counts.limited.items()):
            limited.add_metric([policy], float(value))
        yield limited
        fallbacks = CounterMetricFamily(
            "companion_ratelimit_fallbacks",
            "Decisions taken by this instance's in-process limiter because Redis was unreachable",
        )
        fallbacks.add_metric([], float(counts.fallbacks))
        yield fallbacks
        unavailable = CounterMetricFamily(
            "companion_ratelimit_unavailable",
            "Requests refused with 503 because Redis was unreachable and RATE_LIMIT_FAIL_CLOSED is set",
        )
        unavailable.add_metric([], float(counts.refused_unavailable))
        yield unavailable


class _MemoryCollector(Collector):
    """Long-term memory on this instance: recalls and how they ended, memories written, failures."""

    def __init__(self, services: Services) -> None:
        self._services = services

    def collect(self) -> Iterator[CounterMetricFamily]:
        stats = self._services.memories.stats
        recalls = CounterMetricFamily(
            "companion_memory_recalls", "Memory recalls before a reply, by outcome", labels=["outcome"]
        )
        recalls.add_metric(["timeout"], float(stats.recall_timeouts))
        recalls.add_metric(["failed"], float(stats.recall_failures))
        recalls.add_metric(["ok"], float(stats.recalls - stats.recall_timeouts - stats.recall_failures))
        yield recalls
        written = CounterMetricFamily("companion_memory_written", "Memories added or updated", labels=["action"])
        written.add_metric(["added"], float(stats.added))
        written.add_metric(["updated"], float(stats.updated))
        yield written
        failures = CounterMetricFamily("companion_memory_extraction_failures", "Background extractions that failed")
        failures.add_metric([], float(stats.extraction_failures))
        yield failures


class _OverloadCollector(Collector):
    """Admission control per gate (`turn`: chat turns, `other`: every other gated request), the
    database pool's waits that ended `overloaded`, Redis calls that failed only because our own
    loop stalled, and the event loop's lateness."""

    def __init__(self, services: Services) -> None:
        self._services = services

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        admitted = CounterMetricFamily("companion_admission_admitted", "Requests admitted", labels=["gate"])
        queued = CounterMetricFamily(
            "companion_admission_queued", "Requests that waited in the admission queue", labels=["gate"]
        )
        shed = CounterMetricFamily(
            "companion_admission_shed",
            "Requests refused with 503 overloaded (queue full, or waited too long)",
            labels=["gate", "reason"],
        )
        wait = HistogramMetricFamily(
            "companion_admission_queue_wait_seconds", "Time queued requests waited", labels=["gate"]
        )
        in_flight = GaugeMetricFamily("companion_admission_in_flight", "Requests holding a slot", labels=["gate"])
        waiting = GaugeMetricFamily("companion_admission_waiting", "Requests in the queue", labels=["gate"])
        admission = self._services.admission
        for name, gate in (admission.gates() if admission is not None else {}).items():
            stats = gate.stats
            admitted.add_metric([name], float(stats.admitted))
            queued.add_metric([name], float(stats.queued))
            shed.add_metric([name, "queue_full"], float(stats.shed_full))
            shed.add_metric([name, "queue_timeout"], float(stats.shed_timeout))
            cumulative, buckets = 0, []
            for bound, count in zip((*WAIT_BUCKETS, float("inf")), stats.wait_buckets, strict=True):
                cumulative += count
                buckets.append((str(bound) if bound != float("inf") else "+Inf", cumulative))
            wait.add_metric([name], buckets, stats.wait_sum)
            in_flight.add_metric([name], float(gate.in_flight))
            waiting.add_metric([name], float(gate.waiting))
        yield from (admitted, queued, shed, wait, in_flight, waiting)
        pool = CounterMetricFamily(
            "companion_database_pool_timeouts", "Waits for a pooled database connection that ended 503 overloaded"
        )
        pool.add_metric([], float(self._services.database.pool_timeouts))
        yield pool
        redis = self._services.redis
        late = CounterMetricFamily(
            "companion_redis_late_calls",
            "Redis calls that failed only because this process was busy (not counted by the circuit breaker)",
        )
        late.add_metric([], float(redis.late if redis is not None else 0))
        yield late
        loop = self._services.loop
        lag = GaugeMetricFamily(
            "companion_event_loop_lag_seconds", "The event loop's worst lateness over the last 10 seconds"
        )
        lag.add_metric([], loop.max_lag() if loop is not None else 0.0)
        yield lag
        stalled = CounterMetricFamily("companion_event_loop_stalled_seconds", "Time the event loop ran late, in total")
        stalled.add_metric([], loop.stalled if loop is not None else 0.0)
        yield stalled


def build_registry(services: Services) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(services.cache.stats)
    registry.register(_DegradedCollector(services))
    registry.register(_MemoryCollector(services))
    registry.register(_RateLimitCollector(services))
    registry.register(_OverloadCollector(services))
    return registry


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    registry: CollectorRegistry = request.app.state.metrics_registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
