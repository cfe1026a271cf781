"""One contract for every run log (companion/runs): the in-process log and a Redis Stream per reply
on a private redis-server, through one parametrized fixture."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from companion.cache import keys
from companion.cache.redis import RedisBackend, make_client
from companion.runs.events import END_OFFSET, RunEvent, parse_position
from companion.runs.log import RunLog, RunLogMissing, RunLogStalled
from companion.runs.memory import MemoryRunLog
from companion.runs.redis import RedisRunLog
from tests.support.live import wait_for
from tests.support.redis_proc import RedisProcess, running_redis
from tests.support.redis_topologies import TOPOLOGIES, backend_on

DEADLINE = 10.0
TTL = 60.0


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisProcess]:
    async with running_redis(tmp_path / "redis") as server:
        yield server


@pytest.fixture(params=["memory", "redis", *TOPOLOGIES])
def log_server(request: pytest.FixtureRequest) -> RedisProcess | str | None:
    """None for the in-process log; the private redis-server for the Redis one; "cluster" or
    "sentinel" for the private Redis Cluster or Sentinel set."""
    if request.param in TOPOLOGIES:
        return str(request.param)
    return request.getfixturevalue("redis_server") if request.param == "redis" else None


@pytest.fixture
async def log(log_server: RedisProcess | str | None, request: pytest.FixtureRequest) -> AsyncIterator[RunLog]:
    if log_server is None:
        yield MemoryRunLog(ttl_seconds=TTL)
        return
    if isinstance(log_server, str):
        on_topology = backend_on(log_server, request)
        try:
            yield RedisRunLog(on_topology, ttl_seconds=TTL, running_ttl_seconds=600, max_entries=1000, poll_seconds=0.01)
        finally:
            await on_topology.aclose()
        return
    server = log_server
    backend = loaded_machine_backend(server.url)
    try:
        yield RedisRunLog(backend, ttl_seconds=TTL, running_ttl_seconds=600, max_entries=1000, poll_seconds=0.01)
    finally:
        await backend.aclose()


def loaded_machine_backend(url: str) -> RedisBackend:
    """Generous timeouts: the shared test machine can stall any round trip for a while."""
    return RedisBackend(make_client(url, socket_timeout_ms=5000, connect_timeout_ms=5000), timeout=5.0)


def reply_events(*tokens: str, message_id: int = 7) -> list[RunEvent]:
    events = [RunEvent("message", 0, data={"message_id": message_id})]
    offset = 0
    for token in tokens:
        events.append(RunEvent("token", offset, token))
        offset += len(token)
    return events


def done(text: str) -> RunEvent:
    return RunEvent("done", len(text), data={"content": text})


async def collect(log: RunLog, message_id: int, offset: int, stall: float = DEADLINE) -> list[RunEvent]:
    async with asyncio.timeout(DEADLINE):
        return [event async for event in log.follow(message_id, offset, stall_seconds=stall)]


def text_of(events: list[RunEvent]) -> str:
    return "".join(event.text for event in events if event.kind == "token")


async def test_a_reply_is_replayed_from_the_start_and_from_any_event_id(log: RunLog) -> None:
    tokens = ["Hé ", "👋🏽 ", "naïve ", "end."]  # multi-code-point emoji: offsets count code points
    text = "".join(tokens)
    await log.write(7, reply_events(*tokens))
    await log.write(7, [done(text)])

    everything = await collect(log, 7, -1)
    assert [e.kind for e in everything] == ["message", "token", "token", "token", "token", "done"]
    assert [e.id for e in everything] == ["0", *[str(len("".join(tokens[: i + 1]))) for i in range(4)], "end"]
    assert text_of(everything) == text

    # A client that has the text up to any event id gets exactly the rest, nothing twice.
    for event in everything[:-1]:
        have = text[: int(event.id)]
        rest = await collect(log, 7, parse_position(event.id))  # type: ignore[arg-type]
        assert have + text_of(rest) == text
        assert rest[-1].kind == "done" and all(e.kind != "message" for e in rest)

    # An offset inside a stored batch (a client that was fed token by token by the writer).
    assert text_of(await collect(log, 7, 5)) == text[5:]
    assert await collect(log, 7, END_OFFSET) == []


async def test_a_follower_gets_new_events_live_until_the_terminal_one(log: RunLog) -> None:
    await log.write(3, reply_events("one ", message_id=3))
    received: list[RunEvent] = []

    async def follow() -> None:
        async for event in log.follow(3, -1, stall_seconds=DEADLINE):
            received.append(event)

    follower = asyncio.create_task(follow())
    try:
        await wait_for(lambda: len(received) == 2, timeout=DEADLINE, what="the stored events")
        await log.write(3, [RunEvent("token", 4, "two ")])
        await wait_for(lambda: len(received) == 3, timeout=DEADLINE, what="the new event")
        assert not follower.done()  # no terminal event yet: still following
        await log.write(3, [RunEvent("error", 8, data={"error": {"code": "x"}})])
        async with asyncio.timeout(DEADLINE):
            await follower
    finally:
        follower.cancel()
    assert [e.kind for e in received] == ["message", "token", "token", "error"]
    assert text_of(received) == "one two "


async def test_an_unknown_reply_is_missing_and_a_silent_one_stalls(log: RunLog) -> None:
    with pytest.raises(RunLogMissing):
        await collect(log, 404, -1)
    await log.write(5, reply_events("only ", message_id=5))
    with pytest.raises(RunLogStalled):
        await collect(log, 5, -1, stall=0.2)


async def test_a_stop_request_is_seen_by_the_writer(log: RunLog) -> None:
    assert await log.write(9, reply_events("a ", message_id=9)) is False
    await log.request_stop(9)
    assert await log.write(9, [RunEvent("token", 2, "b ")]) is True
    assert await log.write(9, []) is True  # an empty batch still asks


async def test_the_redis_stream_is_batched_capped_and_expires_after_the_end(redis_server: RedisProcess) -> None:
    backend = loaded_machine_backend(redis_server.url)
    try:
        log = RedisRunLog(backend, ttl_seconds=30, running_ttl_seconds=600, max_entries=100, poll_seconds=0.01)
        stream = keys.reply_events(11)
        assert keys.reply_stop(11).startswith("companion:v1:{m:11}:")  # one hash tag: one cluster slot
        calls_before = int((await backend.client.info("stats"))["total_commands_processed"])
        await log.write(11, reply_events(*[f"w{i} " for i in range(500)], message_id=11))
        calls = int((await backend.client.info("stats"))["total_commands_processed"]) - calls_before
        assert calls <= 505  # one pipeline: the XADDs, PEXPIRE, EXISTS (and the INFO itself)
        assert await backend.client.xlen(stream) < 250  # capped near max_entries (approximately)
        assert 500 < await backend.client.pttl(stream) <= 600_000  # a running reply's stream expires too
        await log.write(11, [done("x")])
        assert 0 < await backend.client.pttl(stream) <= 30_000
    finally:
        await backend.aclose()


async def test_the_in_process_log_hands_a_follower_what_is_there_in_one_batch() -> None:
    """A model faster than the follower: the events that are there when the follower wakes up come
    as one list (the response writes them in one go), then each new event as it comes."""
    log = MemoryRunLog(ttl_seconds=TTL)
    log.append(5, reply_events("a ", "b ", "c ", message_id=5))
    batches: list[list[RunEvent]] = []

    async def follow() -> None:
        async for batch in log.follow_batches(5, -1, stall_seconds=DEADLINE):
            batches.append(batch)

    follower = asyncio.create_task(follow())
    try:
        await wait_for(lambda: len(batches) == 1, timeout=DEADLINE, what="the stored events")
        assert [e.kind for e in batches[0]] == ["message", "token", "token", "token"]
        log.append(5, [RunEvent("token", 6, "d ")])
        log.append(5, [done("a b c d ")])
        async with asyncio.timeout(DEADLINE):
            await follower
    finally:
        follower.cancel()
    assert [[e.kind for e in batch] for batch in batches[1:]] == [["token", "done"]]
    assert text_of([e for batch in batches for e in batch]) == "a b c d "
