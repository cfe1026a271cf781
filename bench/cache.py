"""The guide's per-lookup rows: personality resolution, preferences, the last N messages, each from
the database (PostgreSQL) only, from Redis, and in process; then the rate-limit check
(`bench.ratelimit`). Every tier runs through the service's own code path, warm."""

from __future__ import annotations

import uuid

import asyncpg
from sqlalchemy import select

from bench import ratelimit, seed
from bench.env import BenchEnv
from bench.harness import Budget, Case, Measured, compare
from bench.report import Bars, Outcome, Row, Section, latency_table
from companion.cache.local import LocalCache
from companion.cache.tiered import TieredCache
from companion.conversations.buffer import BufferedMessage, MemoryConversationBuffer, stamp
from companion.personalities.cached import CachedPersonalityService
from companion.personalities.service import PersonalityService
from companion.preferences.cached import CachedPreferenceService
from companion.preferences.schemas import Preferences
from companion.preferences.service import PreferenceService
from companion.storage.database import Database
from companion.storage.models import User

PREFERENCES = Preferences(preferred_name="Ana", reply_length="short", tone="casual", interests=("music", "hiking"))


def redis_only(cache: TieredCache) -> TieredCache:
    """The same Redis backend behind a disabled L1: every read is a Redis hit (the L2 path)."""
    local = LocalCache()
    local.enabled = False
    return TieredCache(cache.backend, local=local, stats=cache.stats)


def _rows(results: dict[str, Measured], baseline: str) -> list[Row]:
    base = results[baseline]
    return [
        Row(m.label, m.stats, "" if key == baseline else f"{base.ratio(m):.0f}x faster than the database")
        for key, m in results.items()
    ]


def _bars(name: str, title: str, results: dict[str, Measured]) -> Bars:
    values = list(results.values())
    return Bars(
        name, title, [m.label for m in values], [m.stats.p50_us for m in values], [m.stats.p99_us for m in values]
    )


async def run(env: BenchEnv, budget: Budget) -> Outcome:
    services = await env.services(redis=True)
    assert services.redis is not None
    user = await services.users.create("bench-cache")
    await services.preferences.put(user.id, PREFERENCES)
    seeded = await seed.conversation(services.database, user.id, messages=40)
    conversation_id = seeded.conversation.id
    window = services.settings.short_term_memory_size
    database = services.database

    uncached_personalities = PersonalityService(database)
    l2_only = redis_only(services.cache)
    redis_personalities = CachedPersonalityService(database, l2_only)
    uncached_preferences = PreferenceService(database)
    redis_preferences = CachedPreferenceService(database, l2_only)

    name = seeded.conversation.personality
    personality = await compare(
        [
            Case("database", "database only (PostgreSQL)", lambda i: uncached_personalities.resolve(user.id, name)),
            Case("redis", "Redis (L1 off)", lambda i: redis_personalities.resolve(user.id, name)),
            Case("l1", "in-process L1 hit", lambda i: services.personalities.resolve(user.id, name)),
        ],
        budget,
        title="personality",
    )
    preferences = await compare(
        [
            Case("database", "database only (PostgreSQL)", lambda i: uncached_preferences.get(user.id)),
            Case("redis", "Redis (L1 off)", lambda i: redis_preferences.get(user.id)),
            Case("l1", "in-process L1 hit", lambda i: services.preferences.get(user.id)),
        ],
        budget,
        title="preferences",
    )

    rows = await services.conversations.recent_messages(conversation_id, window)
    buffered = [BufferedMessage(id=m.id, role=m.role, content=m.content, at=stamp(m.created_at)) for m in rows]
    await services.buffer.replace(conversation_id, buffered)
    local_buffer = MemoryConversationBuffer(max_messages=window)
    await local_buffer.replace(conversation_id, buffered)

    async def from_redis(_: int) -> None:
        found = await services.buffer.recent(conversation_id, window)
        assert found is not None and len(found) == window

    messages = await compare(
        [
            Case(
                "database",
                "database only (PostgreSQL)",
                lambda i: services.conversations.recent_messages(conversation_id, window),
            ),
            Case("redis", "Redis conversation buffer", from_redis),
            Case(
                "memory", "in-process buffer (Redis disabled)", lambda i: local_buffer.recent(conversation_id, window)
            ),
        ],
        budget,
        title=f"last {window} messages",
    )

    pinging = Database(env.database_url, pool_size=services.settings.database_pool_size)
    pinging.engine.pool._pre_ping = True  # SQLAlchemy's pool_pre_ping: the one difference from ours
    admin = await asyncpg.connect(env.database_url.replace("+asyncpg", ""))

    async def one_query(database: Database) -> None:
        async with database.session() as session:
            await session.scalar(select(User.memory_generation).where(User.id == user.id))

    sessions = await compare(
        [
            Case(
                "configured",
                "SQLAlchemy session, one SELECT (as configured: ping only after 1 s idle)",
                lambda i: one_query(database),
            ),
            Case("pre_ping", "the same with SQLAlchemy's pool_pre_ping (a ping on every checkout)", lambda i: one_query(pinging)),
            Case(
                "asyncpg",
                "asyncpg alone, the same SELECT (one round trip)",
                lambda i: admin.fetchval("SELECT memory_generation FROM users WHERE id = $1", user.id),
            ),
        ],
        budget,
        title="database session",
    )
    await admin.close()
    await pinging.dispose()

    limits = await ratelimit.measure(env.redis_url, budget, prefix=f"bench:{uuid.uuid4().hex[:8]}:")
    await env.close_services(services)

    lookups = Section(
        title="Lookups: personality, preferences, recent messages",
        intro="Each lookup through the service's own code: *database only* is the uncached service on PostgreSQL "
        "(one pooled session, one query); *Redis* is the tiered cache with its in-process L1 turned off, so every "
        "read is a Redis GET plus decoding; *L1* is the normal warm path. The messages are the last "
        f"{window} (`SHORT_TERM_MEMORY_SIZE`) of a 40-message conversation. The guide promised: personality "
        "5-10 ms → under 1 ms, preferences 3-5 ms → under 1 ms, messages 2-5 ms → under 0.5 ms.",
        tables=[
            latency_table(_rows(personality, "database"), first="personality resolution", note="vs database"),
            latency_table(_rows(preferences, "database"), first="preferences", note="vs database"),
            latency_table(_rows(messages, "database"), first=f"last {window} messages", note="vs database"),
            latency_table(
                [
                    Row(m.label, m.stats, f"{m.ratio(sessions['asyncpg']):.1f}x asyncpg alone")
                    for m in sessions.values()
                ],
                first="what one database read costs",
                note="p50 ratio",
            ),
        ],
        charts=[
            _bars("personality.png", "Personality resolution", personality),
            _bars("preferences.png", "Preferences", preferences),
            _bars("messages.png", f"Last {window} messages", messages),
        ],
    )
    figures = {
        "db.session.p50_us": sessions["configured"].stats.p50_us,
        "db.session_pre_ping.p50_us": sessions["pre_ping"].stats.p50_us,
        "personality.l1.p50_us": personality["l1"].stats.p50_us,
        "personality.redis.p50_us": personality["redis"].stats.p50_us,
        "personality.database.p50_us": personality["database"].stats.p50_us,
        "preferences.redis.p50_us": preferences["redis"].stats.p50_us,
        "messages.redis.p50_us": messages["redis"].stats.p50_us,
        "ratelimit.ours.p50_us": limits["ours.redis"].stats.p50_us,
        "ratelimit.limits.p50_us": limits["limits.moving.redis"].stats.p50_us,
        "ratelimit.ratio": limits["ours.redis"].ratio(limits["limits.moving.redis"]),
        "ratelimit.ping.p50_us": limits["ping.redis"].stats.p50_us,
        "ratelimit.ours.memory.p50_us": limits["ours.memory"].stats.p50_us,
    }
    return Outcome([lookups, ratelimit.section(limits)], figures)
