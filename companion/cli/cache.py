"""`companion cache ...`: hit rates per namespace (scraped from running instances' /metrics) beside
Redis's own counters, and invalidation of cached entries with SCAN + UNLINK on our prefix only."""

from __future__ import annotations

from typing import Annotated

import httpx
import typer
from prometheus_client.parser import text_string_to_metric_families

from companion.cache import keys
from companion.cache.backend import CacheUnavailable
from companion.cache.redis import RedisBackend
from companion.cache.tiered import CACHED_NAMESPACES, TieredCache
from companion.cache.topology import RedisOptions, make_topology
from companion.cli.support import CliFailure, fail, run, settings_or_exit
from companion.config import Settings
from companion.types import is_valid_name

cache_app = typer.Typer(help="Inspect and invalidate the cache.", no_args_is_help=True)


def _scrape(url: str) -> dict[str, dict[str, float]]:
    """Per namespace: l1 and l2 hits, misses, errors, from one instance's /metrics."""
    try:
        text = httpx.get(url.rstrip("/") + "/metrics", timeout=5).text
    except httpx.HTTPError as error:
        raise CliFailure(f"cannot reach {url}/metrics ({type(error).__name__}); is the service running?") from None
    stats: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            namespace = sample.labels.get("namespace")
            if namespace is None:
                continue
            row = stats.setdefault(namespace, {"l1": 0.0, "l2": 0.0, "misses": 0.0, "errors": 0.0})
            if sample.name == "companion_cache_hits_total":
                row[sample.labels.get("tier", "l1")] += sample.value
            elif sample.name == "companion_cache_misses_total":
                row["misses"] += sample.value
            elif sample.name == "companion_cache_errors_total":
                row["errors"] += sample.value
    return stats


def _backend(settings: Settings) -> RedisBackend:
    """Standalone, cluster or sentinel, as the service would connect (REDIS_MODE)."""
    topology = make_topology(RedisOptions.from_settings(settings))
    return RedisBackend(topology.client, topology=topology)


async def _redis_info(settings: Settings) -> dict[str, object] | None:
    if not settings.redis_enabled:
        return None
    backend = _backend(settings)
    try:
        return await backend.info()
    except CacheUnavailable:
        raise CliFailure("cannot reach Redis at REDIS_URL; check that it is running.") from None
    finally:
        await backend.aclose()


@cache_app.command("stats")
def stats(
    url: Annotated[list[str] | None, typer.Option("--url", help="A running instance (repeat for several).")] = None,
) -> None:
    """Hit rate per namespace across the given instances, and Redis's own hits, misses and memory."""
    settings = settings_or_exit()
    totals: dict[str, dict[str, float]] = {}
    for instance in url or ["http://127.0.0.1:8000"]:
        try:
            scraped = _scrape(instance)
        except CliFailure as failure:
            fail(failure.message, failure.code)
        for namespace, row in scraped.items():
            total = totals.setdefault(namespace, dict.fromkeys(row, 0.0))
            for field, value in row.items():
                total[field] += value
    typer.echo(f"{'NAMESPACE':<12} {'L1 HITS':>10} {'REDIS HITS':>10} {'MISSES':>10} {'ERRORS':>8} {'HIT RATE':>9}")
    for namespace, row in sorted(totals.items()):
        lookups = row["l1"] + row["l2"] + row["misses"]
        rate = f"{(row['l1'] + row['l2']) / lookups:.1%}" if lookups else "-"
        typer.echo(
            f"{namespace:<12} {row['l1']:>10.0f} {row['l2']:>10.0f} {row['misses']:>10.0f} {row['errors']:>8.0f} {rate:>9}"
        )
    info = run(_redis_info(settings))
    if info is None:
        typer.echo("\nRedis: disabled (REDIS_ENABLED=false); each instance caches in its own process.")
        return
    hits, misses = int(info.get("keyspace_hits", 0)), int(info.get("keyspace_misses", 0))  # type: ignore[call-overload]
    rate = f"{hits / (hits + misses):.1%}" if hits + misses else "-"
    used = info.get("used_memory")
    memory = f"{int(used) / 2**20:.1f}M" if isinstance(used, int) else info.get("used_memory_human", "?")
    primaries = info.get("primaries", 1)
    over = f" over {primaries} primaries" if isinstance(primaries, int) and primaries > 1 else ""
    typer.echo(
        f"\nRedis{over}: keyspace_hits {hits}, keyspace_misses {misses} (hit rate {rate}), "
        f"used_memory {memory}, maxmemory_policy {info.get('maxmemory_policy', '?')}"
    )


async def _invalidate(settings: Settings, pattern: str) -> int:
    backend = _backend(settings)
    try:
        cache = TieredCache(backend)
        removed = await cache.invalidate_matching(pattern)
        if cache.pending_invalidations:
            raise CliFailure("cannot reach Redis at REDIS_URL; nothing was invalidated.")
        return removed
    finally:
        await backend.aclose()


@cache_app.command("invalidate")
def invalidate(
    namespace: Annotated[str | None, typer.Argument(help="personality, prefs or apikey")] = None,
    name: Annotated[str | None, typer.Argument(help="A personality name (all users' entries for it).")] = None,
    everything: Annotated[bool, typer.Option("--all", help="Every cached entry of every namespace.")] = False,
) -> None:
    """Drop cached entries in Redis and in every instance's in-process cache (SCAN + UNLINK on our
    own prefix, then one invalidation message; never KEYS or FLUSHDB)."""
    settings = settings_or_exit()
    if not settings.redis_enabled:
        raise typer.BadParameter(
            "Redis is disabled: each instance caches in its own process; restart it, or wait "
            "CACHE_LOCAL_TTL_SECONDS for entries to expire."
        )
    if everything:
        patterns = [keys.namespace_pattern(ns) for ns in CACHED_NAMESPACES]
    elif namespace == "personality" and name:
        if not is_valid_name(name):
            raise typer.BadParameter(f"{name!r} is not a personality name")
        patterns = [keys.personality_pattern(name)]
    elif namespace in CACHED_NAMESPACES and not name:
        patterns = [keys.namespace_pattern(namespace)]
    else:
        raise typer.BadParameter("say `personality NAME`, a namespace (personality, prefs, apikey), or --all")
    removed = sum(run(_invalidate(settings, pattern)) for pattern in patterns)
    typer.echo(f"Invalidated {removed} Redis entries; every instance's in-process cache was told to drop them.")
