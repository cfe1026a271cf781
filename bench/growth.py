"""Growth: how the per-request cost changes with the length of the conversation (10 to 10,000
messages) and with the number of long-term memories a user has (100 to 10,000).

- conversation length: one context assembly (memory off, so only the conversation varies), with
  Redis, with Redis disabled, and from the database only;
- memories per user: `MemoryService.recall` for a new message (embedding + exact search), for a
  repeated message (the memory-search cache answers), the vector search alone, and the load of the
  user's vector matrix from the database (once per change of the user's memories). Recall runs with
  a deadline long enough to see its whole cost (the service gives up at MEMORY_RETRIEVAL_DEADLINE_MS).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from bench import context as context_group
from bench import seed
from bench.env import BenchEnv
from bench.harness import Budget, Case, compare, progress
from bench.report import Lines, Outcome, Row, Section, latency_table
from companion.preferences.schemas import Preferences


async def run(env: BenchEnv, budget: Budget, *, quick: bool) -> Outcome:
    lengths = (10, 10_000) if quick else (10, 100, 1000, 10_000)
    counts = (100, 1000) if quick else (100, 1000, 10_000)
    outcome = Outcome()
    outcome.sections.append(await _conversation_length(env, budget, lengths))
    outcome.sections.append(await _memories(env, budget, counts, quick=quick))
    return outcome


async def _conversation_length(env: BenchEnv, budget: Budget, lengths: tuple[int, ...]) -> Section:
    redis = await env.services(redis=True)
    local = await env.services(redis=False)
    variants = {
        "redis": ("Redis", context_group.assembler(redis)),
        "local": ("Redis disabled", context_group.assembler(local)),
        "database": ("database only", context_group.database_only(redis)),
    }
    user = await redis.users.create("bench-growth-conversation")
    await redis.preferences.put(user.id, Preferences(memory_enabled=False))
    window = redis.settings.short_term_memory_size
    series: dict[str, list[float | None]] = {label: [] for label, _ in variants.values()}
    rows: list[Row] = []
    for length in lengths:
        seeded = await seed.conversation(redis.database, user.id, messages=length, summary_window=window)
        scenario = context_group.Scenario(f"{length}", f"{length} messages", user.id, seeded, fresh_queries=False)
        for _, assembler in variants.values():
            await context_group.assemble(assembler, scenario, 0)
        results = await compare(
            [
                Case(key, label, functools.partial(context_group.assemble_op, assembler, scenario))
                for key, (label, assembler) in variants.items()
            ],
            budget,
            title=f"growth: {length} messages",
        )
        for key, measured in results.items():
            series[variants[key][0]].append(measured.stats.p50_us / 1000)
            rows.append(Row(f"{length:,} messages: {variants[key][0]}", measured.stats))
    await env.close_services(redis)
    await env.close_services(local)
    return Section(
        title="Growth: conversation length",
        intro="One context assembly (long-term memory off) on conversations of growing length, each with a running "
        f"summary of everything before its last {window} messages. Reads are bounded by the window: the buffer holds "
        "the last N messages and the database query walks the (conversation_id, id) index backwards.",
        tables=[latency_table(rows, first="conversation", note="")],
        charts=[
            Lines(
                "growth-conversation.png",
                "Context assembly vs conversation length",
                [float(n) for n in lengths],
                series,
                "messages in the conversation",
                "p50 (ms)",
            )
        ],
    )


async def _memories(env: BenchEnv, budget: Budget, counts: tuple[int, ...], *, quick: bool) -> Section:
    title = "Growth: long-term memories per user"
    if not context_group.memory_available():
        return Section(title, notes=["Not measured: memory retrieval not built yet."])
    from companion.memory.service import MemoryService
    from companion.memory.store import SqlVectorStore

    services = await env.services(redis=True)
    source = services.memories
    await source.start()
    patient = MemoryService(
        source.store, source.embedder, source._cache, config=dataclasses.replace(source.config, deadline_seconds=60.0)
    )
    store = source.store
    series: dict[str, list[float | None]] = {}
    rows: list[Row] = []
    vector = (await source.embedder.embed(["what do you remember about my sister?"]))[0]
    for count in counts:
        user = await services.users.create(f"bench-growth-memories-{count}")
        await seed.memories(
            services.database,
            user.id,
            count=count,
            model_id=source.embedder.model_id,
            dimensions=source.embedder.dimensions,
        )
        await patient.recall(user.id, "warm-up")

        async def fresh(i: int, user_id: Any = user.id) -> None:
            await patient.recall(user_id, f"{seed.sentence(i, 8)} ({i})")

        async def repeated(i: int, user_id: Any = user.id) -> None:
            await patient.recall(user_id, "what do you remember about my sister?")

        generation = await store.generation(user.id)

        async def search(i: int, user_id: Any = user.id, generation: int = generation) -> None:
            await store.search(user_id, vector, source.config.top_k, generation=generation)

        async def load(i: int, user_id: Any = user.id) -> None:
            fresh_store = SqlVectorStore(
                services.database, model_id=source.embedder.model_id, dimensions=source.embedder.dimensions
            )
            await fresh_store.search(user_id, vector, source.config.top_k)

        results = await compare(
            [
                Case("fresh", "recall, a new message (embedding + search)", fresh),
                Case("repeated", "recall, a repeated message (cache hit)", repeated),
                Case("search", "vector search only (matrix in memory)", search),
            ],
            budget,
            title=f"growth: {count} memories",
        )
        loads = await compare(
            [Case("load", "matrix load from the database (after a change)", load)],
            dataclasses.replace(
                budget, rounds=min(budget.rounds, 3), min_iterations=2 if quick else 5, seconds=min(budget.seconds, 0.3)
            ),
            title=f"growth: {count} memories, matrix load",
        )
        results.update(loads)
        for measured in results.values():
            series.setdefault(measured.label, []).append(measured.stats.p50_us / 1000)
            rows.append(Row(f"{count:,} memories: {measured.label}", measured.stats))
    embed = await _embedding_time(source.embedder)
    await env.close_services(services)
    deadline = services.settings.memory_retrieval_deadline_ms
    return Section(
        title=title,
        intro=f"Each user has N memories (random unit vectors, {source.embedder.dimensions} dimensions; search cost does not "
        f"depend on what they say), top {source.config.top_k} plus {source.config.recent} recent. The service's "
        f"recall deadline is {deadline:.0f} ms (MEMORY_RETRIEVAL_DEADLINE_MS); here it is lifted to see the whole "
        f"cost. Embedding one short message alone: p50 {embed}.",
        tables=[latency_table(rows, first="memories", note="")],
        charts=[
            Lines(
                "growth-memories.png",
                "Memory recall vs memories per user",
                [float(n) for n in counts],
                series,
                "memories per user",
                "p50 (ms)",
            )
        ],
    )


async def _embedding_time(embedder: Any) -> str:
    from bench.harness import format_us, percentile, time_loop

    async def one(i: int) -> None:
        await embedder.embed([f"{seed.sentence(i, 8)} ({i})"])

    samples, _ = await time_loop(one, 30)
    progress(f"growth: embedding one message p50 {format_us(percentile(sorted(samples), 0.5) / 1000)}")
    return format_us(percentile(sorted(samples), 0.5) / 1000)
