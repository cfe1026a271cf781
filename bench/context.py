"""Context assembly of one chat request: everything `ContextAssembler` reads before the model is
called (personality, preferences, the recent messages through the buffer, the running summary, the
long-term memories), as `ChatService.begin` calls it. Three backends, side by side:

- Redis: the service as built with REDIS_ENABLED=true (L1 → Redis → database), warm;
- Redis disabled: the service as built with REDIS_ENABLED=false (L1 → in-process backend), warm;
- database only: the uncached services, a buffer that never holds anything and a cache backend that
  stores nothing, so every read goes to PostgreSQL (the vector store still keeps its per-generation
  matrix in memory: that is the store's own design, not a cache layer).

And three users: long-term memory turned off; memory on with nothing remembered yet (the common
case); and memory on with 100 memories, a new message each time (recall embeds the message and
searches, as a real turn does). The user's memory generation is passed in, as `ChatService.begin`
does: a turn reads it in the transaction that stores the user's message, not in context assembly.
"""

from __future__ import annotations

import builtins
import functools
import importlib.util
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import seed
from bench.env import BenchEnv
from bench.harness import Budget, Case, Measured, compare, progress
from bench.report import Bars, Outcome, Row, Section, latency_table
from companion.cache.local import LocalCache
from companion.cache.stats import CacheStats
from companion.cache.tiered import TieredCache
from companion.chat.context import ContextAssembler
from companion.chat.summary import Summarizer
from companion.conversations.buffer import BufferedMessage
from companion.conversations.service import ConversationService
from companion.personalities.service import PersonalityService
from companion.preferences.schemas import Preferences
from companion.preferences.service import PreferenceService
from companion.services import Services

MEMORIES = 100
PROFILE_DIR = Path(".bench/profiles")


class NoCacheBackend:
    """A cache backend that stores nothing: every tiered read falls through to its loader."""

    name = "none"

    async def get(self, key: str) -> bytes | None:
        return None

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        return [None] * len(keys)

    async def set(self, key: str, value: bytes, ttl_seconds: float | None = None) -> None:
        return None

    async def add(self, key: str, value: bytes, ttl_seconds: float) -> bool:
        return True

    async def set_if_locked(self, key: str, value: bytes, ttl_seconds: float, lock_key: str, token: str) -> bool:
        return True

    async def delete(self, *keys: str) -> int:
        return 0

    async def expire(self, key: str, ttl_seconds: float) -> bool:
        return False

    async def incr(self, key: str) -> int:
        return 1

    async def sadd(self, key: str, member: str, ttl_seconds: float | None = None) -> None:
        return None

    async def srem(self, key: str, member: str) -> None:
        return None

    async def smembers(self, key: str) -> builtins.set[str]:
        return set()

    async def delete_matching(self, pattern: str) -> int:
        return 0

    async def publish(self, channel: str, message: bytes) -> None:
        return None

    async def ping(self) -> float:
        return 0.0

    async def aclose(self) -> None:
        return None


class NoBuffer:
    """A conversation buffer that is always empty: the recent messages come from the database."""

    async def recent(self, conversation_id: uuid.UUID, limit: int) -> list[BufferedMessage] | None:
        return None

    async def replace(self, conversation_id: uuid.UUID, messages: Sequence[BufferedMessage]) -> None:
        return None

    async def append(self, conversation_id: uuid.UUID, message: BufferedMessage, *, after: str | None = None) -> bool:
        return False

    async def drop(self, conversation_id: uuid.UUID) -> None:
        return None


def memory_available() -> bool:
    """Whether the long-term memory feature (companion.memory with MemoryService.recall) is built."""
    if importlib.util.find_spec("companion.memory") is None:
        return False
    try:
        from companion.memory.service import MemoryService
    except ImportError:
        return False
    return hasattr(MemoryService, "recall")


def assembler(services: Services) -> ContextAssembler:
    """The assembler exactly as Services.build wires it."""
    return ContextAssembler(
        conversations=services.conversations,
        personalities=services.personalities,
        preferences=services.preferences,
        buffer=services.buffer,
        summarizer=services.summarizer,
        memories=getattr(services, "memories", None),
        cache=services.cache,
        window=services.settings.short_term_memory_size,
    )


def database_only(services: Services) -> ContextAssembler:
    """The same assembler with every cache layer taken out (reads go to the database)."""
    database = services.database
    local = LocalCache()
    local.enabled = False
    nothing = TieredCache(NoCacheBackend(), local=local)
    memories: Any = None
    source = getattr(services, "memories", None)
    if source is not None:
        from companion.cache.memory_search import MemorySearchCache
        from companion.memory.service import MemoryService
        from companion.memory.store import SqlVectorStore

        embedder = source.embedder
        memories = MemoryService(
            SqlVectorStore(database, model_id=embedder.model_id, dimensions=embedder.dimensions),
            embedder,
            MemorySearchCache(NoCacheBackend(), stats=CacheStats()),
            config=source.config,
        )
    return ContextAssembler(
        conversations=ConversationService(database),
        personalities=PersonalityService(database),
        preferences=PreferenceService(database),
        buffer=NoBuffer(),
        summarizer=Summarizer(database, nothing, window=services.settings.short_term_memory_size),
        memories=memories,
        cache=nothing,
        window=services.settings.short_term_memory_size,
    )


@dataclass
class Scenario:
    key: str
    title: str
    user_id: uuid.UUID
    seeded: seed.SeededConversation
    fresh_queries: bool
    generation: int | None = None  # the user's memory generation, read with the stored message


async def assemble_op(context: ContextAssembler, scenario: Scenario, index: int) -> object:
    return await assemble(context, scenario, index)


async def assemble(context: ContextAssembler, scenario: Scenario, index: int) -> int:
    """What ChatService.begin reads, in its order; returns the number of history messages."""
    conversation = scenario.seeded.conversation
    _, preferences = await context.profile(scenario.user_id, conversation)
    history = await context.history(conversation.id, scenario.seeded.newest, after=scenario.seeded.after)
    await context.summary(conversation.id)
    query = f"{seed.sentence(index)} ({index})" if scenario.fresh_queries else scenario.seeded.newest.content
    await context.recall(scenario.user_id, preferences, query, generation=scenario.generation)
    return len(history)


async def scenarios(services: Services, *, with_memories: bool) -> list[Scenario]:
    window = services.settings.short_term_memory_size
    found: list[Scenario] = []
    for key, title, memory_on, count in (
        ("off", "long-term memory off", False, 0),
        ("empty", "memory on, nothing remembered yet", True, 0),
        ("recall", f"memory on, {MEMORIES} memories, a new message each time", True, MEMORIES),
    ):
        if count and not with_memories:
            continue
        user = await services.users.create(f"bench-context-{key}")
        await services.preferences.put(user.id, Preferences(preferred_name="Ana", memory_enabled=memory_on))
        seeded = await seed.conversation(services.database, user.id, messages=40, summary_window=window)
        if count:
            memories = services.memories
            await seed.memories(
                services.database,
                user.id,
                count=count,
                model_id=memories.embedder.model_id,
                dimensions=memories.embedder.dimensions,
            )
        generation = await services.memories.store.generation(user.id) if memory_on else None
        found.append(Scenario(key, title, user.id, seeded, fresh_queries=bool(count), generation=generation))
    return found


async def run(env: BenchEnv, budget: Budget, *, profile: bool = False) -> Outcome:
    with_memories = memory_available()
    redis = await env.services(redis=True)
    local = await env.services(redis=False)
    if with_memories:
        await redis.memories.start()
        await local.memories.start()
    variants = {
        "redis": ("Redis", assembler(redis)),
        "local": ("Redis disabled (in process)", assembler(local)),
        "database": ("database only, no cache", database_only(redis)),
    }
    found = await scenarios(redis, with_memories=with_memories)
    outcome = Outcome()
    tables = []
    bar_labels: list[str] = []
    bar_p50: list[float] = []
    bar_p99: list[float] = []
    for scenario in found:
        for _, context in variants.values():  # the first call rebuilds the buffer from the database
            await assemble(context, scenario, 0)
        results = await compare(
            [
                Case(key, label, functools.partial(assemble_op, context, scenario))
                for key, (label, context) in variants.items()
            ],
            budget,
            title=f"context ({scenario.key})",
        )
        tables.append(_table(scenario, results))
        for key, measured in results.items():
            bar_labels.append(f"{scenario.key}: {variants[key][0]}")
            bar_p50.append(measured.stats.p50_us)
            bar_p99.append(measured.stats.p99_us)
        suffix = "" if scenario.key == "empty" else f".{scenario.key}"
        outcome.figures[f"context{suffix}.redis.p50_us"] = results["redis"].stats.p50_us
        outcome.figures[f"context{suffix}.local.p50_us"] = results["local"].stats.p50_us
        outcome.figures[f"context{suffix}.database.p50_us"] = results["database"].stats.p50_us
        outcome.figures[f"context{suffix}.speedup"] = results["database"].ratio(results["redis"])
        if profile:
            await _profile(variants["redis"][1], scenario)
    if with_memories:
        timeouts = redis.memories.stats.recall_timeouts + local.memories.stats.recall_timeouts
        notes = [
            f"Memory recalls past the {redis.settings.memory_retrieval_deadline_ms:.0f} ms deadline during "
            f"these rows: {timeouts}."
        ]
    else:
        notes = ["The memory rows: not measured: memory retrieval not built yet."]
    await env.close_services(redis)
    await env.close_services(local)
    outcome.sections.append(
        Section(
            title="Context assembly of one chat request",
            intro=(__doc__ or "").split("\n\n", 1)[1].strip()
            + "\n\nEach row is one assembly: `profile` (personality and preferences), `history` (append the new "
            "message to the buffer and read the window, or rebuild it from the database), `summary` and "
            f"`recall`, on a 40-message conversation with a running summary. The window is "
            f"{redis.settings.short_term_memory_size} messages.",
            tables=tables,
            charts=[Bars("context.png", "Context assembly of one chat request", bar_labels, bar_p50, bar_p99)],
            notes=notes,
        )
    )
    return outcome


def _table(scenario: Scenario, results: dict[str, Measured]) -> Any:
    database = results["database"]
    rows = [
        Row(m.label, m.stats, "" if key == "database" else f"{database.ratio(m):.1f}x faster than the database")
        for key, m in results.items()
    ]
    return latency_table(rows, first=f"context assembly: {scenario.title}", note="vs database only")


async def _profile(context: ContextAssembler, scenario: Scenario) -> None:
    """pyinstrument over a few hundred assemblies with Redis: where the time goes."""
    from pyinstrument import Profiler

    PROFILE_DIR.mkdir(parents=True, exist_ok=True)
    profiler = Profiler(interval=0.0005, async_mode="disabled")
    with profiler:
        for index in range(300):
            await assemble(context, scenario, 10_000 + index)
    path = PROFILE_DIR / f"context-redis-{scenario.key}.txt"
    path.write_text(profiler.output_text(unicode=True, show_all=False))
    progress(f"profile written to {path}")
