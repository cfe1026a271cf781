"""How late this process's event loop runs, and timeouts that do not blame a dependency for it.

A CPU-saturated worker runs each ready callback late: a Redis reply that arrived in 100 µs may be
read 300 ms later, and a plain `asyncio.timeout(0.25)` around it fires although Redis was fine.
`LoopMonitor` ticks every few milliseconds and adds up how late each tick ran (the loop's stall
time). `LagTolerantTimeout` grants its operation `seconds` of *available* loop time: when its
deadline comes it adds the stall observed since it started (and its own lateness) and waits on,
up to a hard `cap` of wall time. A dependency that does not answer while the loop is responsive
still times out after `seconds`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from types import TracebackType

# Below this, lateness is the loop's ordinary scheduling jitter, not a stall.
_JITTER = 0.002

# The innermost LagTolerantTimeout of the running task, for `excluded_wait`.
_CURRENT: ContextVar[LagTolerantTimeout | None] = ContextVar("companion_lag_tolerant_timeout", default=None)


class LoopMonitor:
    """Measures the event loop's stall time. `start()` on the loop to watch; `stop()` at the end.

    `stalled` only grows: read it before an operation and again after to know how much of that
    wall time the loop spent unable to run anything else (a long callback, or a long queue of them).
    """

    def __init__(self, *, interval: float = 0.025, window: float = 10.0) -> None:
        self.interval = interval
        self.stalled = 0.0  # seconds the loop ran ticks late, in total
        self.ticks = 0
        self._window = window
        self._recent: deque[tuple[float, float]] = deque()  # (time, lateness) of late ticks in the window
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    @property
    def running(self) -> bool:
        return self._handle is not None

    def start(self) -> None:
        if self._handle is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._due = self._loop.time() + self.interval
        self._handle = self._loop.call_at(self._due, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        late = now - self._due
        self.ticks += 1
        if late > _JITTER:
            self.stalled += late
            self._recent.append((now, late))
        while self._recent and self._recent[0][0] < now - self._window:
            self._recent.popleft()
        self._due = now + self.interval
        self._handle = self._loop.call_at(self._due, self._tick)

    def stalled_now(self) -> float:
        """`stalled`, plus the stall in progress if a tick is overdue right now (the caller may be
        running in the same late loop turn, before the monitor's tick has been able to count it)."""
        if self._loop is None or self._handle is None:
            return self.stalled
        return self.stalled + max(self._loop.time() - self._due, 0.0)

    def max_lag(self) -> float:
        """The worst lateness of a tick in the last `window` seconds (0 when the loop kept up)."""
        if self._loop is not None and self._recent and self._recent[0][0] < self._loop.time() - self._window:
            self._recent = deque(item for item in self._recent if item[0] >= self._loop.time() - self._window)
        return max((late for _, late in self._recent), default=0.0)

    def timeout(self, seconds: float, *, cap: float | None = None) -> LagTolerantTimeout:
        return LagTolerantTimeout(self, seconds, cap=cap)


class LagTolerantTimeout:
    """`async with monitor.timeout(0.25, cap=2.0):` raises TimeoutError once the block has had
    `seconds` of loop time not lost to stalls, or `cap` seconds of wall time, whichever first."""

    __slots__ = (
        "_cap",
        "_due",
        "_handle",
        "_loop",
        "_monitor",
        "_paused_at",
        "_seconds",
        "_stalled",
        "_start",
        "_timeout",
        "_token",
    )

    def __init__(self, monitor: LoopMonitor | None, seconds: float, *, cap: float | None = None) -> None:
        self._monitor = monitor
        self._seconds = seconds
        self._cap = max(cap if cap is not None else seconds * 8, seconds)
        self._timeout = asyncio.timeout(None)
        self._handle: asyncio.TimerHandle | None = None
        self._paused_at: float | None = None
        self._token: Token[LagTolerantTimeout | None] | None = None

    async def __aenter__(self) -> LagTolerantTimeout:
        await self._timeout.__aenter__()
        self._loop = asyncio.get_running_loop()
        self._start = self._loop.time()
        self._stalled = self._monitor.stalled_now() if self._monitor is not None else 0.0
        self._due = self._start + self._seconds
        self._handle = self._loop.call_at(self._due, self._check)
        self._token = _CURRENT.set(self)
        return self

    def _check(self) -> None:
        now = self._loop.time()
        if self._paused_at is not None:
            # Waiting in one of our own queues (`excluded_wait`), which bounds that wait itself.
            self._due = now + self._seconds
            self._handle = self._loop.call_at(self._due, self._check)
            return
        own_lateness = now - self._due
        stalled = self._monitor.stalled_now() - self._stalled if self._monitor is not None else 0.0
        due = min(self._start + self._seconds + max(stalled, own_lateness), self._start + self._cap)
        if own_lateness > _JITTER and due <= now:
            # This check ran late, so the loop was stalled at the deadline: whatever I/O arrived
            # meanwhile is being handled in this very loop turn. Look again after it.
            due = now + _JITTER
        if due > now and now < self._start + self._cap:
            self._due = due
            self._handle = self._loop.call_at(due, self._check)
            return
        self._handle = None
        self._timeout.reschedule(self._loop.time())

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._token is not None:
            _CURRENT.reset(self._token)
            self._token = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        await self._timeout.__aexit__(exc_type, exc, tb)  # turns its own cancellation into TimeoutError

    def expired(self) -> bool:
        return self._timeout.expired()


@contextmanager
def excluded_wait() -> Iterator[None]:
    """Time spent inside does not count against the enclosing `LagTolerantTimeout`: a wait for one
    of our own pooled connections is this process being busy, bounded by the pool's own wait, and
    says nothing about the dependency the timeout is for."""
    current = _CURRENT.get()
    if current is None or current._handle is None:
        yield
        return
    loop = current._loop
    current._paused_at = started = loop.time()
    try:
        yield
    finally:
        current._paused_at = None
        current._start += loop.time() - started
