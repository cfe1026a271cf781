"""The conversation buffer's contract, identical for Redis and in-process: newest N kept, atomic
appends that never leave a gap, duplicate or reordering, misses that say "rebuild from the database"."""

from __future__ import annotations

import asyncio
import random
import uuid

from companion.cache import keys
from companion.cache.redis import RedisBackend
from companion.conversations.buffer import BufferedMessage, ConversationBuffer, RedisConversationBuffer
from tests.buffer.conftest import MAX


def msg(i: int, role: str = "user") -> BufferedMessage:
    return BufferedMessage(id=i, role=role, content=f"message {i} ✓")


async def test_a_new_conversation_is_a_miss_and_append_does_not_create_it(buffer: ConversationBuffer) -> None:
    conversation = uuid.uuid4()
    assert await buffer.recent(conversation, MAX) is None
    assert await buffer.append(conversation, msg(1)) is False
    assert await buffer.recent(conversation, MAX) is None  # rebuilt from the database, never half-built


async def test_replace_then_append_keeps_the_newest_n_in_order(buffer: ConversationBuffer) -> None:
    conversation = uuid.uuid4()
    await buffer.replace(conversation, [msg(i) for i in range(1, 4)])
    for i in range(4, 12):
        assert await buffer.append(conversation, msg(i, "assistant" if i % 2 else "user"))
    recent = await buffer.recent(conversation, MAX)
    assert [m.id for m in recent or []] == list(range(12 - MAX, 12))
    assert (recent or [])[-1].content == "message 11 ✓"
    assert [m.id for m in await buffer.recent(conversation, 2) or []] == [10, 11]


async def test_replace_keeps_only_the_newest_n(buffer: ConversationBuffer) -> None:
    conversation = uuid.uuid4()
    await buffer.replace(conversation, [msg(i) for i in range(1, 20)])
    assert [m.id for m in await buffer.recent(conversation, 100) or []] == list(range(20 - MAX, 20))


async def test_duplicate_append_is_ignored(buffer: ConversationBuffer) -> None:
    conversation = uuid.uuid4()
    await buffer.replace(conversation, [msg(1), msg(2)])
    assert await buffer.append(conversation, msg(2))
    assert [m.id for m in await buffer.recent(conversation, MAX) or []] == [1, 2]


async def test_out_of_order_append_drops_the_buffer_instead_of_reordering(buffer: ConversationBuffer) -> None:
    conversation = uuid.uuid4()
    await buffer.replace(conversation, [msg(1), msg(5)])
    assert await buffer.append(conversation, msg(3)) is False
    assert await buffer.recent(conversation, MAX) is None


async def test_conversations_are_independent_and_drop_removes_one(buffer: ConversationBuffer) -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    await buffer.replace(a, [msg(1)])
    await buffer.replace(b, [msg(2)])
    await buffer.drop(a)
    assert await buffer.recent(a, MAX) is None
    assert [m.id for m in await buffer.recent(b, MAX) or []] == [2]


async def test_concurrent_appends_keep_the_newest_n_or_drop_the_buffer(buffer: ConversationBuffer) -> None:
    """Appends sent concurrently may reach Redis in any order (each on its own connection). Either
    all arrived in order and the buffer is exactly the newest N, or one arrived late, dropped the
    buffer and made every later append a miss: a miss, never a gap, a duplicate or more than N."""
    conversation = uuid.uuid4()
    await buffer.replace(conversation, [msg(0)])
    added = await asyncio.gather(*(buffer.append(conversation, msg(i)) for i in range(1, 40)))
    recent = await buffer.recent(conversation, 100)
    expected = list(range(40 - MAX, 40)) if all(added) else None
    assert ([m.id for m in recent] if recent is not None else None) == expected, (added, recent)


async def test_concurrent_appends_out_of_order_drop_the_buffer_instead_of_leaving_a_gap(
    buffer: ConversationBuffer,
) -> None:
    """Appends racing in a shuffled order: the first that arrives after a newer one drops the
    buffer, so the next read is a miss (rebuilt from the database), never a gap or a reordering."""
    conversation = uuid.uuid4()
    await buffer.replace(conversation, [msg(0)])
    order = list(range(1, 40))
    random.Random(18).shuffle(order)
    added = await asyncio.gather(*(buffer.append(conversation, msg(i)) for i in order))
    assert await buffer.recent(conversation, 100) is None
    assert not all(added), "an append that arrived out of order said it was kept"


async def test_redis_list_is_bounded_and_always_has_a_ttl(redis_backend: RedisBackend) -> None:
    buffer = RedisConversationBuffer(redis_backend, max_messages=MAX, ttl_seconds=3600)
    conversation = uuid.uuid4()
    key = keys.conversation_buffer(conversation)
    await buffer.replace(conversation, [msg(1)])
    for i in range(2, 30):
        await buffer.append(conversation, msg(i))
        assert await redis_backend.client.llen(key) <= MAX
        assert 0 < await redis_backend.client.pttl(key) <= 3_600_000


async def test_redis_read_refreshes_the_ttl(redis_backend: RedisBackend) -> None:
    buffer = RedisConversationBuffer(redis_backend, max_messages=MAX, ttl_seconds=3600)
    conversation = uuid.uuid4()
    key = keys.conversation_buffer(conversation)
    await buffer.replace(conversation, [msg(1)])
    await redis_backend.client.pexpire(key, 5_000)
    await buffer.recent(conversation, MAX)
    assert await redis_backend.client.pttl(key) > 5_000


async def test_memory_buffer_expires_on_its_clock() -> None:
    from companion.conversations.buffer import MemoryConversationBuffer
    from tests.buffer.conftest import Clock

    clock = Clock()
    buffer = MemoryConversationBuffer(max_messages=MAX, ttl_seconds=60, clock=clock)
    conversation = uuid.uuid4()
    await buffer.replace(conversation, [msg(1)])
    clock.now += 59
    assert await buffer.recent(conversation, MAX) is not None  # refreshed: 60 s from now again
    clock.now += 59
    assert await buffer.recent(conversation, MAX) is not None
    clock.now += 61
    assert await buffer.recent(conversation, MAX) is None
