"""The short-term buffer: the last SHORT_TERM_MEMORY_SIZE messages of each conversation, kept hot
in Redis (or in process) so that assembling a prompt reads no database rows.

The database stays the system of record; the buffer is only ever a copy of its newest messages:

* `append` is one atomic Lua script (push, trim, expire) and only extends a buffer that exists and
  whose newest entry is older than the new message and, when the caller says which, is the message
  that precedes it in the database; anything else deletes the buffer, so it is rebuilt from the
  database on the next read instead of ever holding a gap, a duplicate or a reordering. The list is
  never longer than N and never without a TTL.
* Each entry carries its message's `stamp` (its `created_at`, which is also written to the
  conversation's `updated_at`), so that a turn can check the buffer against the conversation row
  before extending it: an instance that stored messages while it could not reach Redis could not drop
  the buffer either, and Redis may come back with the old list (persistence) or have stayed
  reachable for other instances all along (a partition).
* `recent` refreshes the TTL; a miss (expiry, eviction, FLUSHDB, restart) returns None and the caller
  rebuilds from the database with `replace`, again one atomic script.
* A streaming reply is appended once, when it has settled, so no half-written copy is ever left.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Protocol

import orjson
import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict

from companion.cache import keys
from companion.cache.redis import RedisBackend

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def stamp(moment: datetime) -> str:
    """A message's place in its conversation's timeline as kept in the buffer: its `created_at` in
    microseconds since the epoch, as a string (compared exactly, also in Lua)."""
    return str((moment - _EPOCH) // timedelta(microseconds=1))


class BufferedMessage(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: int
    role: str
    content: str
    at: str | None = None  # `stamp(created_at)`; None (unknown) never matches an expected stamp


class ConversationBuffer(Protocol):
    async def recent(self, conversation_id: uuid.UUID, limit: int) -> list[BufferedMessage] | None:
        """The newest `limit` messages, oldest first, or None on a miss. Raises CacheUnavailable."""
        ...

    async def replace(self, conversation_id: uuid.UUID, messages: Sequence[BufferedMessage]) -> None:
        """Rebuild the buffer from the database's newest messages (oldest first)."""
        ...

    async def append(self, conversation_id: uuid.UUID, message: BufferedMessage, *, after: str | None = None) -> bool:
        """Add a newer message if the buffer exists and, when `after` is given, its newest entry has
        that stamp (the message stored just before this one); otherwise (or out of order) drop it.
        True if the message is now in the buffer."""
        ...

    async def drop(self, conversation_id: uuid.UUID) -> None: ...


_APPEND = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local last = redis.call('LINDEX', KEYS[1], -1)
if last then
  local newest = cjson.decode(last)
  local new_id = tonumber(ARGV[2])
  if newest['id'] == new_id then return 1 end
  if newest['id'] > new_id or (ARGV[5] ~= '' and newest['at'] ~= ARGV[5]) then
    redis.call('DEL', KEYS[1])
    return -1
  end
end
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[3]), -1)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""

_REPLACE = """
redis.call('DEL', KEYS[1])
if #ARGV > 2 then
  for i = 3, #ARGV do redis.call('RPUSH', KEYS[1], ARGV[i]) end
  redis.call('LTRIM', KEYS[1], -tonumber(ARGV[1]), -1)
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
"""

_RECENT = """
local items = redis.call('LRANGE', KEYS[1], -tonumber(ARGV[1]), -1)
if #items > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return items
"""


def _encode(message: BufferedMessage) -> bytes:
    return orjson.dumps({"id": message.id, "role": message.role, "content": message.content, "at": message.at})


class RedisConversationBuffer:
    def __init__(self, backend: RedisBackend, *, max_messages: int, ttl_seconds: float = 3600) -> None:
        self._backend = backend
        client: aioredis.Redis = backend.client
        self.max_messages = max_messages
        self._ttl_ms = int(ttl_seconds * 1000)
        self._append = client.register_script(_APPEND)
        self._replace = client.register_script(_REPLACE)
        self._recent = client.register_script(_RECENT)

    async def recent(self, conversation_id: uuid.UUID, limit: int) -> list[BufferedMessage] | None:
        key = keys.conversation_buffer(conversation_id)
        items = await self._backend.run(
            lambda: self._recent(keys=[key], args=[min(limit, self.max_messages), self._ttl_ms])
        )
        if not items:
            return None
        return [BufferedMessage.model_validate_json(item) for item in items]

    async def replace(self, conversation_id: uuid.UUID, messages: Sequence[BufferedMessage]) -> None:
        key = keys.conversation_buffer(conversation_id)
        encoded = [_encode(m) for m in messages[-self.max_messages :]]
        await self._backend.run(lambda: self._replace(keys=[key], args=[self.max_messages, self._ttl_ms, *encoded]))

    async def append(self, conversation_id: uuid.UUID, message: BufferedMessage, *, after: str | None = None) -> bool:
        key = keys.conversation_buffer(conversation_id)
        args: list[bytes | str | int] = [_encode(message), message.id, self.max_messages, self._ttl_ms, after or ""]
        result = await self._backend.run(lambda: self._append(keys=[key], args=args))
        return int(result) == 1

    async def drop(self, conversation_id: uuid.UUID) -> None:
        await self._backend.delete(keys.conversation_buffer(conversation_id))


class MemoryConversationBuffer:
    """The same semantics in process (REDIS_ENABLED=false), bounded by conversation count."""

    def __init__(
        self,
        *,
        max_messages: int,
        ttl_seconds: float = 3600,
        max_conversations: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_messages = max_messages
        self._ttl = ttl_seconds
        self._max_conversations = max_conversations
        self._clock = clock
        self._data: OrderedDict[uuid.UUID, tuple[list[BufferedMessage], float]] = OrderedDict()

    def _live(self, conversation_id: uuid.UUID) -> list[BufferedMessage] | None:
        item = self._data.get(conversation_id)
        if item is None:
            return None
        if item[1] <= self._clock():
            del self._data[conversation_id]
            return None
        return item[0]

    def _store(self, conversation_id: uuid.UUID, messages: list[BufferedMessage]) -> None:
        if not messages:
            self._data.pop(conversation_id, None)
            return
        self._data[conversation_id] = (messages[-self.max_messages :], self._clock() + self._ttl)
        self._data.move_to_end(conversation_id)
        while len(self._data) > self._max_conversations:
            self._data.popitem(last=False)

    async def recent(self, conversation_id: uuid.UUID, limit: int) -> list[BufferedMessage] | None:
        messages = self._live(conversation_id)
        if not messages:
            return None
        self._store(conversation_id, messages)  # refresh the TTL on activity
        return list(messages[-min(limit, self.max_messages) :])

    async def replace(self, conversation_id: uuid.UUID, messages: Sequence[BufferedMessage]) -> None:
        self._store(conversation_id, list(messages))

    async def append(self, conversation_id: uuid.UUID, message: BufferedMessage, *, after: str | None = None) -> bool:
        messages = self._live(conversation_id)
        if messages is None:
            return False
        if messages and messages[-1].id == message.id:
            return True
        if messages and (messages[-1].id > message.id or (after is not None and messages[-1].at != after)):
            self._data.pop(conversation_id, None)
            return False
        self._store(conversation_id, [*messages, message])
        return True

    async def drop(self, conversation_id: uuid.UUID) -> None:
        self._data.pop(conversation_id, None)
