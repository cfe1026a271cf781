"""Admission in front of the local model's generation slots: a bounded, first-come queue.

At most `slots` generations run at once; at most `queue_size` more wait, each for at most
`max_wait_seconds`. Past either bound the request gets `Overloaded` (503 with Retry-After) before it
costs any model time: a shed request never reaches the model.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from companion.errors import Overloaded


@dataclass(frozen=True, slots=True)
class SlotStats:
    slots: int
    active: int
    waiting: int
    admitted: int
    shed: int


class SlotQueue:
    """Counts slots on the event loop (one loop; no locks needed). Slots are handed to waiters in
    arrival order, so a steady stream of newcomers cannot starve someone already queued."""

    def __init__(
        self,
        slots: int,
        *,
        queue_size: int,
        max_wait_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if slots < 1 or queue_size < 0 or max_wait_seconds <= 0:
            raise ValueError("slots >= 1, queue_size >= 0 and max_wait_seconds > 0")
        self.slots = slots
        self.queue_size = queue_size
        self.max_wait_seconds = max_wait_seconds
        self._clock = clock
        self._free = slots
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._admitted = 0
        self._shed = 0
        # A running mean of how long a slot is held, for an honest Retry-After.
        self._mean_hold_seconds = 2.0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one slot for the body. Raises Overloaded when the queue is full or the wait runs out."""
        await self.acquire()
        started = self._clock()
        try:
            yield
        finally:
            self._mean_hold_seconds += (max(self._clock() - started, 0.0) - self._mean_hold_seconds) / 8
            self.release()

    async def acquire(self) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            self._admitted += 1
            return
        if len(self._waiters) >= self.queue_size:
            raise self._overloaded("its queue is full")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self.max_wait_seconds):
                await waiter
        except BaseException as error:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot just as we gave up: pass it on
            else:
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            if isinstance(error, TimeoutError):
                raise self._overloaded(f"no generation slot freed within {self.max_wait_seconds:g} s") from None
            raise
        self._admitted += 1

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes straight to the next in line
                return
        self._free += 1

    def retry_after_seconds(self) -> int:
        """Whole seconds until a retry likely finds room: the queue ahead, drained `slots` at a time."""
        rounds = (len(self._waiters) + 1) / self.slots
        return max(1, min(60, math.ceil(rounds * self._mean_hold_seconds)))

    def stats(self) -> SlotStats:
        return SlotStats(self.slots, self.slots - self._free, len(self._waiters), self._admitted, self._shed)

    def _overloaded(self, why: str) -> Overloaded:
        self._shed += 1
        return Overloaded(f"The local model is busy ({why}); retry shortly.", retry_after=self.retry_after_seconds())
