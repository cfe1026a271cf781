"""L1: a bounded in-process map with TTLs, in front of the shared cache.

It holds decoded, immutable values (frozen models), so a hit costs a dict lookup. Each key has an
epoch bumped by every invalidation; a loader that started before an invalidation cannot put its
(possibly stale) result back afterwards. While the invalidation channel is down the whole L1 is
cleared and bypassed (`enabled = False`), since no one could tell us what changed.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

_MISSING = object()


class LocalCache:
    def __init__(self, *, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._data: OrderedDict[str, tuple[Any, float]] = OrderedDict()
        self._epochs: dict[str, int] = {}
        self._global_epoch = 0
        self._max_entries = max_entries
        self._clock = clock
        self.enabled = True

    def get(self, key: str) -> Any:
        """The value, or `MISSING`."""
        if not self.enabled:
            return _MISSING
        item = self._data.get(key)
        if item is None:
            return _MISSING
        if item[1] <= self._clock():
            self._data.pop(key, None)
            return _MISSING
        return item[0]

    def epoch(self, key: str) -> tuple[int, int]:
        return self._global_epoch, self._epochs.get(key, 0)

    def put(self, key: str, value: Any, ttl_seconds: float, epoch: tuple[int, int]) -> bool:
        """Store unless an invalidation happened since `epoch` was read, or L1 is disabled."""
        if not self.enabled or epoch != self.epoch(key):
            return False
        self._data[key] = (value, self._clock() + ttl_seconds)
        self._data.move_to_end(key)
        if len(self._data) > self._max_entries:
            self._data.popitem(last=False)
        return True

    def invalidate(self, key: str) -> None:
        self._data.pop(key, None)
        self._epochs[key] = self._epochs.get(key, 0) + 1
        if len(self._epochs) > 4 * self._max_entries:
            # Forgetting per-key epochs is safe once the global epoch moves too.
            self._epochs.clear()
            self._global_epoch += 1

    def invalidate_prefix(self, prefix: str) -> None:
        for key in [k for k in self._data if k.startswith(prefix)]:
            self._data.pop(key, None)
        self._global_epoch += 1

    def clear(self) -> None:
        self._data.clear()
        self._global_epoch += 1

    def __len__(self) -> int:
        return len(self._data)


MISSING = _MISSING
