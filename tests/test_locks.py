"""KeyedLocks: one holder per key at a time, other keys unaffected, a bounded wait that raises the
caller's error, and no lock left behind once nobody holds or waits (the race the hand-made versions
had: a waiter woken but not yet running must keep the lock alive)."""

from __future__ import annotations

import asyncio

import pytest

from companion.locks import KeyedLocks
from tests.support.live import wait_for


class Busy(Exception):
    pass


async def test_one_holder_per_key_and_keys_are_independent() -> None:
    locks: KeyedLocks[str] = KeyedLocks()
    inside: list[str] = []
    release = asyncio.Event()

    async def hold(key: str, name: str) -> None:
        async with locks.hold(key):
            inside.append(name)
            await release.wait()
            inside.remove(name)

    tasks = [
        asyncio.create_task(hold("a", "a1")),
        asyncio.create_task(hold("a", "a2")),
        asyncio.create_task(hold("b", "b1")),
    ]
    await wait_for(lambda: len(inside) == 2, what="two holders")
    assert sorted(inside) == ["a1", "b1"]  # a2 waits for a1
    assert (locks.users("a"), locks.users("b"), locks.users("c")) == (2, 1, 0)
    release.set()
    await asyncio.gather(*tasks)
    assert inside == [] and len(locks) == 0


async def test_a_woken_waiter_keeps_the_lock_so_a_newcomer_cannot_overlap_it() -> None:
    """The holder lets go while a waiter is queued, and a newcomer arrives in that very step, before
    the waiter runs. Dropping the lock because it looks free (`not lock.locked()`) would hand the
    newcomer a fresh lock, and both would hold the key at once."""
    locks: KeyedLocks[str] = KeyedLocks()
    holders = most = 0
    newcomers: list[asyncio.Task[None]] = []

    async def work(spawn: bool) -> None:
        nonlocal holders, most
        async with locks.hold("user"):
            holders += 1
            most = max(most, holders)
            await asyncio.sleep(0)
            holders -= 1
            if spawn:
                newcomers.append(asyncio.create_task(work(False)))

    async with asyncio.timeout(5):
        await asyncio.gather(work(True), work(False))
        await asyncio.gather(*newcomers)
    assert most == 1 and len(locks) == 0


async def test_a_wait_past_the_bound_raises_the_callers_error_and_leaves_nothing() -> None:
    locks: KeyedLocks[str] = KeyedLocks()
    async with locks.hold("k"):
        with pytest.raises(Busy):
            async with locks.hold("k", wait_seconds=0.01, on_timeout=Busy):
                pass
        with pytest.raises(TimeoutError):
            async with locks.hold("k", wait_seconds=0.01):
                pass
    assert len(locks) == 0


async def test_the_blocks_own_timeout_is_not_turned_into_the_callers_error() -> None:
    locks: KeyedLocks[str] = KeyedLocks()
    with pytest.raises(TimeoutError):
        async with locks.hold("k", wait_seconds=5, on_timeout=Busy):
            raise TimeoutError("from the block")
    assert len(locks) == 0
