"""The Redis run log: one Redis Stream per reply (`XADD`, capped near `max_entries`), written in
batches by the instance running the reply, read by any instance. The stream expires
`running_ttl_seconds` after its last write while the reply runs (so a dead writer's stream goes
away by itself) and `ttl_seconds` after the terminal event. A stop request is a small key beside it
(same hash tag, same cluster slot) that the writer reads in the same round trip as each batch."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from functools import partial
from typing import Any

from companion.cache import keys
from companion.cache.redis import RedisBackend
from companion.runs.events import RunEvent
from companion.runs.log import RunLogMissing, RunLogStalled

STOP_TTL_SECONDS = 60.0


class RedisRunLog:
    def __init__(
        self,
        backend: RedisBackend,
        *,
        ttl_seconds: float = 3600.0,
        running_ttl_seconds: float = 600.0,
        max_entries: int = 10_000,
        poll_seconds: float = 0.05,
    ) -> None:
        self._backend = backend
        self.ttl_seconds = ttl_seconds
        self.running_ttl_seconds = running_ttl_seconds
        self.max_entries = max_entries
        self.poll_seconds = poll_seconds

    async def write(self, message_id: int, events: Sequence[RunEvent]) -> bool:
        stream, stop = keys.reply_events(message_id), keys.reply_stop(message_id)
        ended = any(event.terminal for event in events)
        ttl_ms = int((self.ttl_seconds if ended else self.running_ttl_seconds) * 1000)

        async def run() -> list[Any]:
            # One round trip per batch: the events, the expiry, and whether a stop was asked for.
            async with self._backend.client.pipeline(transaction=False) as pipe:
                for event in events:
                    fields: Any = event.encode()
                    pipe.xadd(stream, fields, maxlen=self.max_entries, approximate=True)
                if events:
                    pipe.pexpire(stream, ttl_ms)
                pipe.exists(stop)
                return await pipe.execute()

        results = await self._backend.run(run)
        return bool(results[-1])

    async def request_stop(self, message_id: int) -> None:
        await self._backend.set(keys.reply_stop(message_id), b"1", STOP_TTL_SECONDS)

    async def _read(self, stream: str, start: str) -> list[Any]:
        return list(await self._backend.client.xrange(stream, min=start, max="+", count=500) or [])

    async def follow(self, message_id: int, offset: int, *, stall_seconds: float) -> AsyncIterator[RunEvent]:
        stream = keys.reply_events(message_id)
        loop = asyncio.get_running_loop()
        last = "-"
        first = True
        idle_since = loop.time()
        while True:
            entries = await self._backend.run(partial(self._read, stream, last))
            if first and not entries:
                raise RunLogMissing(message_id)
            first = False
            for entry_id, fields in entries:
                last = "(" + entry_id.decode()
                event = RunEvent.decode(fields)
                part = event.after(offset)
                if part is not None:
                    offset = max(offset, part.end)
                    yield part
                if event.terminal:
                    return
            if len(entries) == 500:
                continue  # more stored: read on at once
            if entries:
                idle_since = loop.time()
            elif loop.time() - idle_since >= stall_seconds:
                raise RunLogStalled(message_id)
            await asyncio.sleep(self.poll_seconds)
