"""L1 (LocalCache) on its own: bounded, TTLs on an injected clock, epochs that keep a load begun
before an invalidation out, bypassed while disabled. And the counters exported to Prometheus."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from companion.cache.local import MISSING, LocalCache
from companion.cache.stats import CacheStats
from tests.cache.helpers import FakeClock


def test_a_value_is_served_until_its_ttl_runs_out() -> None:
    clock = FakeClock()
    local = LocalCache(clock=clock)
    assert local.put("k", "v", 10, local.epoch("k"))
    clock.advance(9.9)
    assert local.get("k") == "v"
    clock.advance(0.1)
    assert local.get("k") is MISSING
    assert len(local) == 0


def test_beyond_max_entries_the_oldest_entry_goes() -> None:
    local = LocalCache(max_entries=2, clock=FakeClock())
    for key in ("a", "b", "c"):
        local.put(key, key, 10, local.epoch(key))
    assert [local.get(key) for key in ("a", "b", "c")] == [MISSING, "b", "c"]


def test_a_put_with_an_epoch_read_before_an_invalidation_is_refused() -> None:
    local = LocalCache(clock=FakeClock())
    epoch = local.epoch("k")
    local.invalidate("k")
    assert not local.put("k", "stale", 10, epoch)
    assert local.get("k") is MISSING
    assert local.put("k", "fresh", 10, local.epoch("k"))


def test_clear_refuses_puts_begun_before_it_for_every_key() -> None:
    local = LocalCache(clock=FakeClock())
    epochs = {key: local.epoch(key) for key in ("a", "b")}
    local.put("a", "old", 10, epochs["a"])
    local.clear()
    assert local.get("a") is MISSING
    assert not local.put("b", "stale", 10, epochs["b"])


def test_forgetting_per_key_epochs_still_refuses_older_puts() -> None:
    local = LocalCache(max_entries=1, clock=FakeClock())
    epoch = local.epoch("k")
    for index in range(10):  # more invalidated keys than it keeps epochs for
        local.invalidate(f"other-{index}")
    local.invalidate("k")
    assert not local.put("k", "stale", 10, epoch)


def test_invalidate_prefix_drops_matching_entries_only() -> None:
    local = LocalCache(clock=FakeClock())
    for key in ("user:1:a", "user:1:b", "user:2:a"):
        local.put(key, key, 10, local.epoch(key))
    local.invalidate_prefix("user:1:")
    assert [local.get(key) for key in ("user:1:a", "user:1:b", "user:2:a")] == [MISSING, MISSING, "user:2:a"]


def test_a_disabled_l1_serves_and_keeps_nothing() -> None:
    local = LocalCache(clock=FakeClock())
    local.put("k", "v", 10, local.epoch("k"))
    local.enabled = False
    assert local.get("k") is MISSING
    assert not local.put("other", "v", 10, local.epoch("other"))


def test_stats_count_hits_misses_and_latency_per_namespace() -> None:
    stats = CacheStats()
    prefs = stats["prefs"]
    prefs.l1_hits, prefs.l2_hits, prefs.misses, prefs.errors = 6, 2, 2, 1
    prefs.observe(0.000005)
    prefs.observe(0.003)
    prefs.observe(5.0)
    assert prefs.hits == 8
    assert prefs.hit_rate == 0.8
    assert stats["personality"].hit_rate == 0.0
    assert sum(prefs.latency_buckets) == 3
    assert prefs.latency_buckets[0] == 1 and prefs.latency_buckets[-1] == 1

    registry = CollectorRegistry()
    registry.register(stats)
    text = generate_latest(registry).decode()
    assert 'companion_cache_hits_total{namespace="prefs",tier="l1"} 6.0' in text
    assert 'companion_cache_hits_total{namespace="prefs",tier="l2"} 2.0' in text
    assert 'companion_cache_misses_total{namespace="prefs"} 2.0' in text
    assert 'companion_cache_errors_total{namespace="prefs"} 1.0' in text
    assert 'companion_cache_get_seconds_bucket{le="+Inf",namespace="prefs"} 3.0' in text
    assert 'companion_cache_get_seconds_count{namespace="prefs"} 3.0' in text
