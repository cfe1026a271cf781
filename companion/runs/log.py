"""The run log interface: where a reply's events are kept while it runs and for a while after, so
that a client can replay them and follow the rest live.

`MemoryRunLog` (this instance's runs, and the only log without Redis) and `RedisRunLog` (a Redis
Stream per reply, read by every instance) implement it; tests/runs/test_run_log_contract.py holds
both to one contract.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from companion.runs.events import RunEvent


class RunLogMissing(Exception):
    """The log has nothing for this reply (never written here, or expired)."""


class RunLogStalled(Exception):
    """Nothing new arrived for the stall deadline and no terminal event yet: its writer may be gone."""


class RunLog(Protocol):
    async def write(self, message_id: int, events: Sequence[RunEvent]) -> bool:
        """Append a batch of events, in order. A batch that holds the terminal event starts the
        log's expiry (kept `ttl_seconds` after the reply ended). Returns whether a stop has been
        requested for this reply. Raises CacheUnavailable (Redis)."""
        ...

    def follow(self, message_id: int, offset: int, *, stall_seconds: float) -> AsyncIterator[RunEvent]:
        """The events a client at `offset` (see `RunEvent.after`) lacks: first those stored, then
        new ones as they are written, up to and including the terminal event. Raises RunLogMissing
        if there is nothing for this reply at the start, RunLogStalled after `stall_seconds`
        without a new event, CacheUnavailable (Redis)."""
        ...

    async def request_stop(self, message_id: int) -> None:
        """Ask the reply's writer to stop it (`write` returns True from then on). Raises
        CacheUnavailable (Redis)."""
        ...
