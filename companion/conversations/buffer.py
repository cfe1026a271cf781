"""The short-term buffer: the last SHORT_TERM_MEMORY_SIZE messages of each conversation, kept hot
in Redis (or in process) so that assembling a prompt reads no database rows.

The database stays the system of record; the buffer is only ever a copy of its newest messages:

* `append` is one atomic Lua script (push, trim, expire) and only extends a buffer that exists and
  whose newest entry is older than the new message; anything else deletes the buffer, so it is
  rebuilt from the database on the next read instead of ever holding a gap, a duplicate or a
  reordering. The list is never longer than N and never without a TTL.
* `recent` refreshes the TTL; a miss (expiry, eviction, FLUSHDB, restart) returns None and the caller
  rebuilds from the database with `replace`, again one atomic script.
* A streaming reply is appended once, when it has settled, so no half-written copy is ever left.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Protocol

import orjson
import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict

from companion.cache import keys
from companion.cache.redis import RedisBackend


class BufferedMessage(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: int
    role: str
    content: str


class ConversationBuffer(Protocol):
    async def recent(self, conversation_id: uuid.UUID, limit: int) -> list[BufferedMessage] | None:
        """The newest `limit` messages, oldest first, or None on a miss. Raises CacheUnavailable."""
        ...

    async def replace(self, conversation_id: uuid.UUID, messages: Sequence[BufferedMessage]) -> None:
        """Rebuild the buffer from the database's newest messages (oldest first)."""
        ...

    async def append(self, conversation_id: uuid.UUID, message: BufferedMessage) -> bool:
        """Add a newer message if the buffer exists; otherwise (or out of order) drop it. True if
        the message is now in the buffer."""
        ...

    async def drop(self, conversation_id: uuid.UUID) -> None: ...


_APPEND = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local last = redis.call('LINDEX', KEYS[1], -1)
if last then
  local last_id = cjson.decode(last)['id']
  local new_id = tonumber(ARGV[2])
  if last_id == new_id then return 1 end
  if last_id > new_id then redis.call('DEL', KEYS[1]) return -1 end
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
    return orjson.dumps({"id": message.id, "role": message.role, "content": message.content})


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

    async def append(self, conversation_id: uuid.UUID, message: BufferedMessage) -> bool:
        key = keys.conversation_buffer(conversation_id)
        result = await self._backend.run(
            lambda: self._append(keys=[key], args=[_encode(message), message.id, self.max_messages, self._ttl_ms])
        )
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

    async def append(self, conversation_id: uuid.UUID, message: BufferedMessage) -> bool:
        messages = self._live(conversation_id)
        if messages is None:
            return False
        if messages and messages[-1].id == message.id:
            return True
        if messages and messages[-1].id > message.id:
            self._data.pop(conversation_id, None)
            return False
        self._store(conversation_id, [*messages, message])
        return True

    async def drop(self, conversation_id: uuid.UUID) -> None:
        self._data.pop(conversation_id, None)
