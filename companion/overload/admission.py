"""Admission control: each worker runs a bounded number of requests of a class at once, keeps a
short bounded queue in front of them, and refuses the rest at once with `Overloaded` (503,
Retry-After), before any work is done or anything is stored.

A `Gate` is one class of work (chat turns, other requests) with its limit, queue length and the
longest a request may wait in the queue; `Permit` is one admitted request's slot, released exactly
once, by whoever holds it last: the HTTP layer, or the turn itself when it outlives the request
(`Permit.hand_over`). Waiters are served first come, first served.

The queue is short in time rather than in length: a request that would, at the rate slots have been
freed lately, wait longer than `max_wait` is refused at once instead of being refused after waiting
(Little's law: the wait ahead of it is the queue length times the mean hold time over the limit).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from companion.errors import Overloaded

# Queue-wait histogram buckets, in seconds.
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class GateStats:
    admitted: int = 0  # got a slot, at once or after queueing
    queued: int = 0  # had to wait in the queue (admitted or shed afterwards)
    shed_full: int = 0  # refused at once: the queue was full, or its expected wait past max_wait
    shed_timeout: int = 0  # waited the longest allowed in the queue, then refused
    wait_sum: float = 0.0
    wait_buckets: list[int] = field(default_factory=lambda: [0] * (len(WAIT_BUCKETS) + 1))

    @property
    def shed(self) -> int:
        return self.shed_full + self.shed_timeout

    def observe_wait(self, seconds: float) -> None:
        self.wait_sum += seconds
        for index, bound in enumerate(WAIT_BUCKETS):
            if seconds <= bound:
                self.wait_buckets[index] += 1
                return
        self.wait_buckets[-1] += 1


class Permit:
    """One admitted request's slot. `release()` is idempotent."""

    __slots__ = ("_gate", "_released", "_started", "handed_over")

    def __init__(self, gate: Gate, started: float) -> None:
        self._gate = gate
        self._started = started
        self._released = False
        self.handed_over = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._gate._release(self._gate._clock() - self._started)

    def hand_over(self) -> Callable[[], None]:
        """The caller takes over the release (e.g. a turn that runs on after its request ends); the
        layer that admitted the request will no longer release it."""
        self.handed_over = True
        return self.release


class Gate:
    """`permit = await gate.acquire()` or `async with gate.admit():`; raises `Overloaded`."""

    def __init__(
        self,
        name: str,
        *,
        limit: int,
        queue: int,
        max_wait: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if limit < 1 or queue < 0 or max_wait < 0:
            raise ValueError("limit must be at least 1, queue and max_wait not negative")
        self.name = name
        self.limit = limit
        self.queue = queue
        self.max_wait = max_wait
        self._clock = clock
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.stats = GateStats()
        # A running mean of how long a permit is held: the expected wait and the Retry-After estimate.
        self._mean_hold = 0.0
        self._holds = 0

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def expected_wait(self) -> float:
        """Seconds a request joining the queue now would likely wait (0 until slots were released)."""
        if self._holds < self.limit:  # too few releases yet for a mean worth acting on
            return 0.0
        return self._mean_hold * (self.waiting + 1) / self.limit

    def retry_after(self) -> int:
        """Whole seconds after which a retry is likely to be admitted: the queue ahead of it, at the
        rate slots have been freed lately; at least 1, at most 60."""
        estimate = self._mean_hold * (self.waiting + 1) / self.limit
        return min(max(math.ceil(estimate), 1), 60)

    def _refuse(self) -> Overloaded:
        return Overloaded(
            f"The server is busy right now ({self.name}); retry in a moment.", retry_after=self.retry_after()
        )

    async def acquire(self) -> Permit:
        if self.in_flight < self.limit and not self._waiters:
            self.in_flight += 1
            self.stats.admitted += 1
            return Permit(self, self._clock())
        if len(self._waiters) >= self.queue or self.expected_wait() > self.max_wait:
            self.stats.shed_full += 1
            raise self._refuse()
        self.stats.queued += 1
        started = self._clock()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self.max_wait):
                await waiter
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():
                pass  # admitted in the same instant as the deadline: keep the slot
            else:
                self._discard(waiter)
                self.stats.shed_timeout += 1
                self.stats.observe_wait(self._clock() - started)
                raise self._refuse() from None
        except BaseException:
            # Cancelled (the client left): give a slot we were just handed to the next in line.
            if waiter.done() and not waiter.cancelled():
                self._release(None)
            else:
                self._discard(waiter)
            raise
        waited = self._clock() - started
        self.stats.observe_wait(waited)
        self.stats.admitted += 1
        return Permit(self, self._clock())

    def _discard(self, waiter: asyncio.Future[None]) -> None:
        waiter.cancel()
        try:
            self._waiters.remove(waiter)
        except ValueError:
            pass

    def _release(self, held: float | None) -> None:
        if held is not None:
            self._holds += 1
            self._mean_hold += (held - self._mean_hold) * (0.1 if self._holds > 10 else 1 / self._holds)
        # The slot passes straight to the next waiter (in_flight stays), or is freed.
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.in_flight -= 1

    def admit(self) -> _Admitted:
        return _Admitted(self)


class _Admitted:
    __slots__ = ("_gate", "permit")

    def __init__(self, gate: Gate) -> None:
        self._gate = gate

    async def __aenter__(self) -> Permit:
        self.permit = await self._gate.acquire()
        return self.permit

    async def __aexit__(self, *_: object) -> None:
        if not self.permit.handed_over:
            self.permit.release()


@dataclass
class Admission:
    """The worker's gates: chat turns, and every other request (health checks and metrics are
    never gated: monitors must get through a busy worker)."""

    turns: Gate
    requests: Gate

    @classmethod
    def build(
        cls,
        *,
        max_turns: int,
        turn_queue: int,
        max_requests: int,
        request_queue: int,
        queue_timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> Admission:
        return cls(
            turns=Gate("chat turns", limit=max_turns, queue=turn_queue, max_wait=queue_timeout, clock=clock),
            requests=Gate("requests", limit=max_requests, queue=request_queue, max_wait=queue_timeout, clock=clock),
        )

    def gates(self) -> dict[str, Gate]:
        return {"turn": self.turns, "other": self.requests}
