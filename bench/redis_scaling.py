"""Redis Cluster beside a single Redis (the `redis` group): the same service code on each, through
the topology factory (`companion.cache.topology`), on a private 6-node cluster (3 primaries,
3 replicas) and the run's private standalone Redis. Rows:

- a cached read (personality, L1 off: every read is a Redis hit), a rate-limit check (one GCRA
  EVALSHA), context assembly (what a chat turn reads before the model, memory off), standalone
  vs cluster;
- invalidation messages on the cluster: classic PUBLISH (broadcast to every node) vs sharded
  SPUBLISH (routed to the channel's shard), publish-to-receipt latency and publish cost;
- Redis memory per user and per conversation (MEMORY USAGE of the keys the service writes);
- Redis CPU and commands per chat turn (how many instances one Redis carries);
- failover under load: a primary SIGKILLed (cluster) / the primary SIGKILLed (Sentinel) while two
  instances serve closed-loop chat traffic.

The cluster and sentinel processes are the test suite's (`tests/support/redis_topologies.py`), and
so is the failover driver (`tests/support/failover.py`): one implementation, measured here and
asserted there.
"""

from __future__ import annotations

import asyncio
import hashlib
import statistics
import time
import uuid
from contextlib import AsyncExitStack
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from bench import seed
from bench.cache import redis_only
from bench.context import Scenario, assemble, assembler
from bench.env import BenchEnv
from bench.harness import Budget, Case, compare, progress
from bench.report import Outcome, Row, Section, Table, latency_table
from companion.cache import keys
from companion.personalities.cached import CachedPersonalityService
from companion.preferences.schemas import Preferences
from companion.ratelimit.limiter import Limit, RedisRateLimiter
from companion.services import Services


async def _read_cases(label: str, services: Services, user_id: uuid.UUID, name: str) -> list[Case]:
    l2 = CachedPersonalityService(services.database, redis_only(services.cache))
    await l2.resolve(user_id, name)
    assert services.redis is not None
    limiter = RedisRateLimiter(services.redis)
    limit = Limit("bench", 50, 60)
    return [
        Case(f"read.{label}", f"cached read, Redis hit ({label})", lambda i: l2.resolve(user_id, name)),
        Case(
            f"limit.{label}",
            f"rate-limit check ({label})",
            lambda i: limiter.hit(keys.rate_limit("bench", f"subject-{i % 64}"), limit),
        ),
    ]


async def _context_case(label: str, services: Services) -> Case:
    user = await services.users.create(f"bench-scaling-{label}")
    await services.preferences.put(user.id, Preferences(preferred_name="Ana", memory_enabled=False))
    window = services.settings.short_term_memory_size
    seeded = await seed.conversation(services.database, user.id, messages=40, summary_window=window)
    scenario = Scenario("off", "memory off", user.id, seeded, fresh_queries=False)
    context = assembler(services)
    await assemble(context, scenario, 0)
    return Case(f"context.{label}", f"context assembly ({label})", lambda i: assemble(context, scenario, i))


async def _pubsub_latency(url_port: int, *, sharded: bool, messages: int) -> tuple[float, float, float]:
    """(p50 ms, p99 ms of publish-to-receipt, publish µs median) on the cluster, one channel."""
    cluster = RedisCluster(host="127.0.0.1", port=url_port)
    await cluster.initialize()
    channel = keys.INVALIDATION_CHANNEL + (":bench-sharded" if sharded else ":bench")
    pubsub = cluster.pubsub()
    received: list[float] = []
    publish_us: list[float] = []
    try:
        if sharded:
            await pubsub.ssubscribe(channel)
        else:
            node = cluster.get_primaries()[-1]
            subscriber = aioredis.Redis(host=node.host, port=int(node.port))
            pubsub = subscriber.pubsub()
            await pubsub.subscribe(channel)
        # The confirmation first.
        for _ in range(50):
            message = await (pubsub.get_sharded_message(timeout=0.1) if sharded else pubsub.get_message(timeout=0.1))
            if message is not None:
                break
        for index in range(messages):
            sent = time.perf_counter()
            if sharded:
                await cluster.spublish(channel, str(index))
            else:
                await cluster.publish(channel, str(index))
            publish_us.append((time.perf_counter() - sent) * 1e6)
            while True:
                message = await (
                    pubsub.get_sharded_message(timeout=1.0) if sharded else pubsub.get_message(timeout=1.0)
                )
                if message is None:
                    break
                if message.get("type") in ("message", "smessage"):
                    received.append((time.perf_counter() - sent) * 1000)
                    break
    finally:
        await pubsub.aclose()
        await cluster.aclose()
    ordered = sorted(received)
    return (
        statistics.median(ordered),
        ordered[int(len(ordered) * 0.99) - 1] if ordered else float("nan"),
        statistics.median(publish_us),
    )


async def _memory_per_user(services: Services) -> dict[str, int]:
    """Bytes of Redis memory (MEMORY USAGE) per key the service writes for one user and one
    conversation, after real requests through the services."""
    assert services.redis is not None
    client = services.redis.client
    created = await services.users.create("bench-memory")
    user_id = created.id
    await services.users.authenticate(created.api_key)
    await services.preferences.put(user_id, Preferences(preferred_name="Ana"))
    await services.preferences.get(user_id)
    seeded = await seed.conversation(services.database, user_id, messages=40)
    await services.personalities.resolve(user_id, seeded.conversation.personality)
    await services.sessions.create(user_id)
    window = services.settings.short_term_memory_size
    rows = await services.conversations.recent_messages(seeded.conversation.id, window)
    from companion.conversations.buffer import BufferedMessage, stamp

    await services.buffer.replace(
        seeded.conversation.id,
        [BufferedMessage(id=m.id, role=m.role, content=m.content, at=stamp(m.created_at)) for m in rows],
    )
    sizes: dict[str, int] = {}
    for label, pattern in (
        ("personality (per personality used)", f"{keys.PREFIX}:{keys.user_tag(user_id)}:personality:*"),
        ("preferences", keys.preferences(user_id)),
        ("API key owner", keys.api_key(hashlib.sha256(created.api_key.encode()).hexdigest())),
        ("session + session index", f"{keys.PREFIX}:{keys.user_tag(user_id)}:session*"),
        (f"conversation buffer ({window} messages)", keys.conversation_buffer(seeded.conversation.id)),
    ):
        total = 0
        async for key in client.scan_iter(match=pattern, count=500):
            total += int(await client.memory_usage(key) or 0)
        sizes[label] = total
    return sizes


async def _redis_cost_per_turn(env: BenchEnv, turns: int) -> dict[str, float]:
    """Commands and Redis CPU per chat turn, through the HTTP API of one instance."""
    import httpx

    from tests.support.instances import running_instances

    settings = env.settings(redis=True, rate_limit_enabled=True, rate_limit_requests_per_minute=100_000)
    admin = aioredis.Redis.from_url(env.redis_url)
    try:
        async with running_instances(settings, 1) as (instance,):
            created = await instance.services.users.create("bench-turns")
            async with instance.client(created.api_key) as http:
                conversation = (await http.post("/v1/conversations", json={"personality": "elara"})).json()
                path = f"/v1/conversations/{conversation['id']}/messages"
                for index in range(5):  # warm
                    await http.post(path, json={"content": f"warm {index}", "stream": False})
                before_stats, before_cpu = await admin.info("stats"), await admin.info("cpu")
                before_calls = await admin.info("commandstats")
                started = time.perf_counter()
                for index in range(turns):
                    response = await http.post(path, json={"content": f"message {index}", "stream": False})
                    if response.status_code != 200:
                        raise httpx.HTTPError(response.text)
                elapsed = time.perf_counter() - started
                after_stats, after_cpu = await admin.info("stats"), await admin.info("cpu")
                after_calls = await admin.info("commandstats")
    finally:
        await admin.aclose()
    commands = int(after_stats["total_commands_processed"]) - int(before_stats["total_commands_processed"])
    cpu = sum(float(after_cpu[k]) - float(before_cpu[k]) for k in ("used_cpu_sys", "used_cpu_user"))
    executing = sum(float(v["usec"]) for v in after_calls.values()) - sum(
        float(v["usec"]) for v in before_calls.values()
    )
    return {
        "commands per turn": commands / turns,
        "Redis command execution µs per turn (commandstats)": executing / turns,
        "Redis process CPU µs per turn (used_cpu, includes I/O and idle housekeeping)": cpu / turns * 1e6,
        "turns/s one instance (closed loop, 1 client)": turns / elapsed,
    }


async def run(env: BenchEnv, budget: Budget, *, quick: bool = False) -> Outcome:
    from tests.support.failover import Worker, run_failover
    from tests.support.instances import running_instances
    from tests.support.redis_topologies import LocalCluster, LocalSentinelSet

    outcome = Outcome()
    cluster = LocalCluster(env.workdir / "cluster")
    progress("starting a 6-node Redis Cluster")
    await asyncio.to_thread(cluster.start)
    try:
        standalone = await env.services(redis=True)
        on_cluster = await env.services(redis=True, redis_mode="cluster", redis_url=cluster.url)
        cases: list[Case] = []
        for label, services in (("standalone", standalone), ("cluster", on_cluster)):
            user = await services.users.create(f"bench-read-{label}")
            cases += await _read_cases(label, services, user.id, "elara")
        results = await compare(cases, budget, title="standalone vs cluster")
        contexts = await compare(
            [await _context_case("standalone", standalone), await _context_case("cluster", on_cluster)],
            budget,
            title="context assembly",
        )
        results.update(contexts)
        rows = []
        for what in ("read", "limit", "context"):
            base, other = results[f"{what}.standalone"], results[f"{what}.cluster"]
            extra = other.stats.p50_us - base.stats.p50_us
            rows.append(Row(base.label, base.stats))
            rows.append(Row(other.label, other.stats, f"{extra:+.0f} µs p50 vs standalone"))
            outcome.figures[f"redis.{what}.cluster_extra_us"] = extra
        progress("pub/sub on the cluster: classic vs sharded")
        messages = 200 if quick else 1000
        port = cluster.primary_ports()[0]
        classic = await _pubsub_latency(port, sharded=False, messages=messages)
        sharded = await _pubsub_latency(port, sharded=True, messages=messages)
        pubsub_table = Table(
            ["invalidation channel on the cluster", "delivery p50", "delivery p99", "publish p50"],
            [
                [f"{name} ({messages} messages, one channel)", f"{p50:.3f} ms", f"{p99:.3f} ms", f"{pub:.0f} µs"]
                for name, (p50, p99, pub) in (("classic PUBLISH", classic), ("sharded SPUBLISH", sharded))
            ],
            right={1, 2, 3},
        )
        sizes = await _memory_per_user(standalone)
        memory_table = Table(
            ["Redis key(s)", "bytes (MEMORY USAGE)"], [[k, f"{v:,}"] for k, v in sizes.items()], right={1}
        )
        cost = await _redis_cost_per_turn(env, turns=30 if quick else 200)
        cost_table = Table(["per chat turn (standalone Redis)", "value"], [[k, f"{v:,.1f}"] for k, v in cost.items()])
        await env.close_services(on_cluster)

        failover_rows = []
        failure_notes: list[str] = []
        for kind in ("cluster", "sentinel"):
            progress(f"failover under load: {kind}")
            sentinels = None
            if kind == "cluster":
                redis_settings: dict[str, Any] = {"redis_mode": "cluster", "redis_url": cluster.url}
                victim = cluster.primary_ports()[0]

                def kill(victim: int = victim) -> None:
                    cluster.kill(victim)
            else:
                sentinels = LocalSentinelSet(env.workdir / "sentinel")
                await asyncio.to_thread(sentinels.start)
                redis_settings = {
                    "redis_mode": "sentinel",
                    "redis_url": sentinels.url,
                    "redis_sentinels": sentinels.sentinel_addresses,
                    "redis_sentinel_master": sentinels.master_name,
                }
                kill = sentinels.kill_primary  # type: ignore[assignment]
            try:
                settings = env.settings(redis=True, rate_limit_enabled=False, **redis_settings)
                async with running_instances(settings, 2) as instances, AsyncExitStack() as stack:
                    workers = []
                    for index in range(4):
                        created = await instances[0].services.users.create(f"bench-failover-{kind}-{index}")
                        clients = [
                            await stack.enter_async_context(instance.client(created.api_key)) for instance in instances
                        ]
                        conversation = (
                            await clients[0].post("/v1/conversations", json={"personality": "elara"})
                        ).json()
                        workers.append(Worker(clients, conversation["id"]))
                    report = await run_failover(kind, workers, [i.http for i in instances], kill)
                failover_rows.append(report.row())
                failure_notes += [f"{kind}: {failure}" for failure in report.failures[:3]]
                for key in ("requests failed", "messages lost", "seconds degraded", "seconds until Redis used again"):
                    value = report.row()[key]
                    if value is not None:
                        outcome.figures[f"redis.failover.{kind}.{key.replace(' ', '_')}"] = float(value)
            finally:
                if sentinels is not None:
                    await asyncio.to_thread(sentinels.cleanup)
                else:
                    await asyncio.to_thread(cluster.heal)
        failover_table = Table(
            list(failover_rows[0]),
            [[str(row[column]) for column in row] for row in failover_rows],
            right={1, 2, 3, 4, 5},
        )
    finally:
        await asyncio.to_thread(cluster.cleanup)
    outcome.sections.append(
        Section(
            "Redis Cluster beside standalone",
            "The same service code through the topology factory, warm, one operation at a time, on this "
            "machine's loopback: a private standalone redis-server and a private 6-node cluster "
            "(3 primaries, 3 replicas). A cluster may cost at most one extra round trip per request.",
            tables=[
                latency_table(rows),
                pubsub_table,
                memory_table,
                cost_table,
                failover_table,
            ],
            notes=[
                "Failover: two instances, 4 closed-loop chat clients alternating between them, a primary "
                "SIGKILLed after 2 s; cluster-node-timeout 2000 ms, sentinel down-after-milliseconds 1000; "
                "'seconds degraded' is how long any instance's /health said Redis was not ok, 'seconds until "
                "Redis used again' runs from the kill until both say ok again.",
                *(f"A failed request: {note}" for note in failure_notes),
            ],
        )
    )
    return outcome
