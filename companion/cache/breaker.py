"""A circuit breaker: after `failure_threshold` consecutive failures, calls are refused for
`reset_seconds` so no request waits on a dead Redis; then one trial call decides (half-open)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

State = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    def __init__(
        self,
        *,
        failure_threshold: int = 3,
        reset_seconds: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.reset_seconds = reset_seconds
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._trial_running = False
        self.outages = 0  # how many times the circuit opened; lets others notice a past outage

    @property
    def state(self) -> State:
        if self._opened_at is None:
            return "closed"
        if self._clock() - self._opened_at >= self.reset_seconds:
            return "half_open"
        return "open"

    def allow(self) -> bool:
        """May a call go through now? In half-open state only one trial call at a time."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._trial_running:
            self._trial_running = True
            return True
        return False

    def record_success(self) -> bool:
        """Returns True when this success ends a run of failures (Redis is back), whether or not
        they were enough to open the circuit: what failed meanwhile can be redone now."""
        recovered = self._opened_at is not None or self._failures > 0
        self._failures = 0
        self._opened_at = None
        self._trial_running = False
        return recovered

    def abandon(self) -> None:
        """A call ended without telling whether Redis works (e.g. it was cancelled): if it was the
        half-open trial, let the next call be the trial instead."""
        self._trial_running = False

    def record_failure(self) -> None:
        self._failures += 1
        self._trial_running = False
        if self._opened_at is not None:
            self._opened_at = self._clock()  # a failed trial: stay open another period
        elif self._failures >= self.failure_threshold:
            self._opened_at = self._clock()
            self.outages += 1
