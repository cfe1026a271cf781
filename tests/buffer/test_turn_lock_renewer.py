"""A turn held through Redis ends even when its lease renewer loses its cancellation (issue 19).

Under overload, a cancellation can be lost in the Redis client's nested timeouts (a timeout and a
cancel arriving together); the renewer then looped on, `hold()` waited for it forever, and the turn
kept its conversation and its admission slot (seen with 320 uncontrolled streams on one worker).
The renewer now also stops on an event. Here the renewal swallows its cancellation on purpose."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from companion.cache.backend import CacheUnavailable
from companion.cache.redis import RedisBackend
from companion.conversations.turns import RedisTurnLock


async def test_a_turn_ends_even_if_its_renewer_loses_its_cancellation(redis_backend: RedisBackend) -> None:
    lock = RedisTurnLock(redis_backend, lease_seconds=0.03)  # a renewal every 10 ms
    renewing = asyncio.Event()

    async def renewal_that_swallows_cancellation(**_: Any) -> None:
        renewing.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise CacheUnavailable("the cancellation was lost on the way") from None

    lock._renew = renewal_that_swallows_cancellation  # type: ignore[assignment]
    conversation = uuid.uuid4()
    async with asyncio.timeout(10) as bound:  # a no-hang bound: before the fix, leaving hold() never returned
        async with lock.hold(conversation):
            await renewing.wait()  # the renewer is in the middle of a renewal
    # (hold() suppresses a CancelledError while it waits for its renewer, so the bound expiring
    # would end the wait without raising: ask it whether it had to.)
    assert not bound.expired()
    async with asyncio.timeout(10):
        async with lock.hold(conversation):  # and the conversation is free again
            pass
