"""What one chat turn costs, counted rather than timed: SQL statements, rows PostgreSQL read, Redis
commands and Python function calls per turn, through `ChatService` (in process, Redis on, the
scripted model), background work included (the summary check, memory writes). Counts do not depend
on how busy the machine is, so they catch a regression that a noisy timing hides; CPU milliseconds
per turn are shown beside them for scale (those do depend on the machine).

Two messages (a question, which long-term memory does not keep, and a statement, which it keeps as
an episode and a fact) at two conversation lengths (100 and 1,000 messages): a turn's work must not grow
with the length of the conversation.

To compare two checkouts side by side, run this group from each with the same venv:
`PYTHONPATH=<checkout> python -m bench --only cost --output /tmp/<name>.md`.
"""

from __future__ import annotations

import cProfile
import pstats
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis
from sqlalchemy import event

from bench import seed
from bench.env import BenchEnv
from bench.harness import progress
from bench.report import Outcome, Section, Table

MESSAGES = {
    "question": "How is it going today?",
    "statement": "I went hiking in the mountains with my sister Anna last weekend.",
}
LENGTHS = (100, 1000)


@dataclass
class Cost:
    statements: float
    rows: float
    redis_commands: float
    calls: float
    cpu_ms: float


async def _rows_read(database: Any) -> int:
    """Rows read from our own tables (sequential scans plus index fetches), system catalogs left out.
    A server process reports its statistics now and then, and always when it exits: the pool's
    connections are closed first, so that everything counted so far is in."""
    await database.engine.dispose()
    async with database.engine.connect() as connection:
        await connection.exec_driver_sql("SELECT pg_stat_clear_snapshot()")
        found = (
            await connection.exec_driver_sql(
                "SELECT sum(coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)) FROM pg_stat_user_tables"
            )
        ).scalar()
    return int(found or 0)


async def _redis_commands(client: redis.Redis) -> int:
    stats = await client.info("commandstats")
    return sum(int(value["calls"]) for name, value in stats.items() if name != "cmdstat_info")


async def measure(env: BenchEnv, message: str, length: int, turns: int) -> Cost:
    services = await env.services(redis=True)
    client = redis.from_url(env.redis_url)
    statements = 0

    def count(*_: Any) -> None:
        nonlocal statements
        statements += 1

    try:
        await services.memories.start()
        user = await services.users.create(f"bench-cost-{length}-{len(message)}")
        conversation = (await seed.conversation(services.database, user.id, messages=length)).conversation
        # Statistics, as autovacuum would have gathered them by the time a conversation is this long
        # (without them the planner takes the bulk-seeded table for an empty one and scans it).
        async with services.database.engine.connect() as connection:
            await connection.exec_driver_sql("ANALYZE")

        async def turn(index: int) -> None:
            begun = await services.chat.begin(user.id, conversation, f"{message} ({index})")
            async for _ in services.chat.run(begun):
                pass

        async def idle() -> None:
            await services.summarizer.wait_idle()
            await services.memories.wait_idle()

        for index in range(5):  # warm up: caches, prepared statements, the embedder
            await turn(index)
        await idle()
        rows_before = await _rows_read(services.database)
        commands_before = await _redis_commands(client)
        event.listen(services.database.engine.sync_engine, "before_cursor_execute", count)
        cpu = time.process_time()
        for index in range(turns):
            await turn(100 + index)
        await idle()
        cpu = time.process_time() - cpu
        event.remove(services.database.engine.sync_engine, "before_cursor_execute", count)
        commands = await _redis_commands(client) - commands_before
        rows = await _rows_read(services.database) - rows_before
        # Python calls in a separate pass: the profiler's own cost would distort the CPU figure.
        for index in range(3):  # the pool's connections again
            await turn(500 + index)
        await idle()
        profiler = cProfile.Profile()
        profiler.enable()
        for index in range(turns):
            await turn(1000 + index)
        await idle()
        profiler.disable()
        calls = sum(value[1] for value in pstats.Stats(profiler).stats.values())  # type: ignore[attr-defined]
        return Cost(statements / turns, rows / turns, (commands - 1) / turns, calls / turns, cpu / turns * 1000)
    finally:
        await client.aclose()
        await env.close_services(services)


async def run(env: BenchEnv, *, quick: bool) -> Outcome:
    turns = 20 if quick else 60
    # Other people's conversations first: a messages table of a few thousand rows, as a service in
    # use has (on a nearly empty table the planner rightly scans it whole, which says nothing).
    services = await env.services(redis=True)
    try:
        others = await services.users.create("bench-cost-others")
        for _ in range(10):
            await seed.conversation(services.database, others.id, messages=200)
    finally:
        await env.close_services(services)
    rows: list[list[str]] = []
    figures: dict[str, float] = {}
    for name, message in MESSAGES.items():
        for length in LENGTHS:
            cost = await measure(env, message, length, turns)
            progress(
                f"cost: {name}, {length} messages: {cost.statements:.1f} statements, {cost.rows:.0f} rows, "
                f"{cost.redis_commands:.1f} Redis commands, {cost.calls:,.0f} calls, {cost.cpu_ms:.1f} ms CPU per turn"
            )
            rows.append(
                [
                    name,
                    str(length),
                    f"{cost.statements:.1f}",
                    f"{cost.rows:.0f}",
                    f"{cost.redis_commands:.1f}",
                    f"{cost.calls:,.0f}",
                    f"{cost.cpu_ms:.1f} ms",
                ]
            )
            figures[f"cost_statements_{name}_{length}"] = cost.statements
            figures[f"cost_rows_{name}_{length}"] = cost.rows
    section = Section(
        title="Cost of a chat turn, counted",
        intro=(
            f"Per turn, {turns} turns in process (`ChatService.begin` and `run`, Redis on, the scripted model), "
            "background work included. Counts do not depend on the machine's load; CPU does (for scale). "
            "Rows: what PostgreSQL read from the service's tables (`pg_stat_user_tables`: sequential scans and index "
            "fetches). A turn's work must not grow with "
            "the conversation: compare the two lengths."
        ),
        tables=[
            Table(
                ["message", "conversation length", "SQL statements", "rows read", "Redis commands", "Python calls", "CPU"],
                rows,
                right={1, 2, 3, 4, 5, 6},
            )
        ],
    )
    return Outcome(sections=[section], figures=figures)
