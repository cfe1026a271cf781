"""The in-process run log: the events of the replies this instance runs, appended as they are
generated (no batching: it costs a list append) and followed by the requests of this instance.
Ended logs are kept `ttl_seconds` (and at most `max_ended` of them), then the database answers."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from companion.runs.events import RunEvent
from companion.runs.log import RunLogMissing, RunLogStalled


@dataclass
class _Log:
    events: list[RunEvent] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    ended_at: float | None = None
    stop: bool = False


class MemoryRunLog:
    def __init__(
        self, *, ttl_seconds: float = 300.0, max_ended: int = 1000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl_seconds = ttl_seconds
        self.max_ended = max_ended
        self._clock = clock
        self._logs: dict[int, _Log] = {}
        self._ended: OrderedDict[int, float] = OrderedDict()  # ended logs, oldest first

    def __contains__(self, message_id: int) -> bool:
        return self._get(message_id) is not None

    def append(self, message_id: int, events: Sequence[RunEvent]) -> bool:
        """`write` without a wait: a run calls it for each event as it happens."""
        log = self._logs.setdefault(message_id, _Log())
        log.events.extend(events)
        if any(event.terminal for event in events) and log.ended_at is None:
            log.ended_at = self._clock()
            self._ended[message_id] = log.ended_at
            self._expire()
        changed, log.changed = log.changed, asyncio.Event()
        changed.set()
        return log.stop

    async def write(self, message_id: int, events: Sequence[RunEvent]) -> bool:
        return self.append(message_id, events)

    async def request_stop(self, message_id: int) -> None:
        self._logs.setdefault(message_id, _Log()).stop = True

    async def follow(self, message_id: int, offset: int, *, stall_seconds: float) -> AsyncIterator[RunEvent]:
        async for batch in self.follow_batches(message_id, offset, stall_seconds=stall_seconds):
            for event in batch:
                yield event

    async def follow_batches(
        self, message_id: int, offset: int, *, stall_seconds: float
    ) -> AsyncIterator[list[RunEvent]]:
        """`follow`, with the events that are there when the follower wakes up as one list: a
        response writes them in one go (one write and one network packet instead of one per token
        when the model is faster than the follower)."""
        log = self._get(message_id)
        if log is None or not log.events:
            raise RunLogMissing(message_id)
        index = 0
        while True:
            changed = log.changed
            batch: list[RunEvent] = []
            ended = False
            while index < len(log.events):
                event = log.events[index]
                index += 1
                part = event.after(offset)
                if part is not None:
                    offset = max(offset, part.end)
                    batch.append(part)
                if event.terminal:
                    ended = True
                    break
            if batch:
                yield batch
            if ended:
                return
            try:
                async with asyncio.timeout(stall_seconds):
                    await changed.wait()
            except TimeoutError:
                raise RunLogStalled(message_id) from None

    def _get(self, message_id: int) -> _Log | None:
        self._expire()
        return self._logs.get(message_id)

    def _expire(self) -> None:
        cutoff = self._clock() - self.ttl_seconds
        while self._ended:
            message_id, ended_at = next(iter(self._ended.items()))
            if ended_at > cutoff and len(self._ended) <= self.max_ended:
                break
            del self._ended[message_id]
            self._logs.pop(message_id, None)
