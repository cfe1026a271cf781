"""Cache counters per namespace, kept as plain integers on the hot path and exported to
Prometheus by a collector at scrape time (a labelled prometheus-client child per hit would cost
more than the L1 hit itself)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

# Latency buckets in seconds: from an L1 hit (microseconds) to a slow database load.
BUCKETS = (0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 1.0)


@dataclass
class NamespaceStats:
    l1_hits: int = 0
    l2_hits: int = 0
    misses: int = 0
    errors: int = 0
    loads: int = 0
    latency_buckets: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    latency_sum: float = 0.0

    @property
    def hits(self) -> int:
        return self.l1_hits + self.l2_hits

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def observe(self, seconds: float) -> None:
        self.latency_sum += seconds
        for index, bound in enumerate(BUCKETS):
            if seconds <= bound:
                self.latency_buckets[index] += 1
                return
        self.latency_buckets[-1] += 1


class CacheStats(Collector):
    def __init__(self) -> None:
        self.namespaces: dict[str, NamespaceStats] = defaultdict(NamespaceStats)
        self.degraded_seconds_total = 0.0

    def __getitem__(self, namespace: str) -> NamespaceStats:
        return self.namespaces[namespace]

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily | GaugeMetricFamily]:
        hits = CounterMetricFamily("companion_cache_hits", "Cache hits", labels=["namespace", "tier"])
        misses = CounterMetricFamily(
            "companion_cache_misses", "Cache misses (loaded from the database)", labels=["namespace"]
        )
        errors = CounterMetricFamily(
            "companion_cache_errors", "Cache backend errors (served without it)", labels=["namespace"]
        )
        latency = HistogramMetricFamily(
            "companion_cache_get_seconds", "Time to get a value, whichever tier answered", labels=["namespace"]
        )
        for name, stats in sorted(self.namespaces.items()):
            hits.add_metric([name, "l1"], stats.l1_hits)
            hits.add_metric([name, "l2"], stats.l2_hits)
            misses.add_metric([name], stats.misses)
            errors.add_metric([name], stats.errors)
            cumulative, buckets = 0, []
            for bound, count in zip((*BUCKETS, float("inf")), stats.latency_buckets, strict=True):
                cumulative += count
                buckets.append((str(bound) if bound != float("inf") else "+Inf", cumulative))
            latency.add_metric([name], buckets, stats.latency_sum)
        yield from (hits, misses, errors, latency)
