"""The bounded queue in front of the local model's generation slots (companion.llm.slots)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from companion.errors import Overloaded
from companion.llm.slots import SlotQueue


async def _wait_until(condition: Callable[[], bool]) -> None:
    """Let the other tasks run until `condition` holds (they need no time, only turns)."""
    async with asyncio.timeout(10):
        while not condition():  # noqa: ASYNC110 - polling a plain counter, no event to wait on
            await asyncio.sleep(0)


async def test_admits_up_to_the_slots_then_queues_then_sheds() -> None:
    queue = SlotQueue(2, queue_size=1, max_wait_seconds=60)
    await queue.acquire()
    await queue.acquire()
    assert queue.stats().active == 2
    waiter = asyncio.create_task(queue.acquire())
    await _wait_until(lambda: queue.stats().waiting == 1)
    with pytest.raises(Overloaded) as shed:
        await queue.acquire()  # the queue is full: answered at once, nothing waits
    assert shed.value.status_code == 503 and shed.value.code == "overloaded" and shed.value.retry_after >= 1
    assert "queue is full" in shed.value.message
    queue.release()
    await waiter  # the freed slot went to the one in line
    stats = queue.stats()
    assert (stats.active, stats.waiting, stats.admitted, stats.shed) == (2, 0, 3, 1)


async def test_slots_pass_in_arrival_order() -> None:
    queue = SlotQueue(1, queue_size=3, max_wait_seconds=60)
    await queue.acquire()
    order: list[int] = []

    async def take(index: int) -> None:
        await queue.acquire()
        order.append(index)

    tasks = []
    for index in range(3):
        tasks.append(asyncio.create_task(take(index)))
        await _wait_until(lambda n=index: queue.stats().waiting == n + 1)
    for expected in range(3):
        queue.release()
        await _wait_until(lambda n=expected: len(order) == n + 1)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2]


async def test_a_wait_that_runs_out_is_shed_and_leaves_nothing_behind() -> None:
    queue = SlotQueue(1, queue_size=4, max_wait_seconds=0.05)
    await queue.acquire()
    with pytest.raises(Overloaded, match=r"within 0\.05 s"):
        await queue.acquire()  # nobody releases: the bounded wait ends it
    assert queue.stats().waiting == 0 and queue.stats().shed == 1
    queue.release()
    assert queue.stats().active == 0


async def test_a_cancelled_waiter_does_not_keep_a_slot() -> None:
    queue = SlotQueue(1, queue_size=4, max_wait_seconds=60)
    await queue.acquire()
    waiter = asyncio.create_task(queue.acquire())
    await _wait_until(lambda: queue.stats().waiting == 1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert queue.stats().waiting == 0
    queue.release()
    assert queue.stats().active == 0
    await queue.acquire()  # the slot is really free
    assert queue.stats().active == 1


async def test_a_slot_handed_over_as_its_waiter_leaves_passes_on() -> None:
    queue = SlotQueue(1, queue_size=4, max_wait_seconds=60)
    await queue.acquire()
    first = asyncio.create_task(queue.acquire())
    second = asyncio.create_task(queue.acquire())
    await _wait_until(lambda: queue.stats().waiting == 2)
    queue.release()  # hands the slot to `first`...
    first.cancel()  # ...which is cancelled before it runs again
    with pytest.raises(asyncio.CancelledError):
        await first
    async with asyncio.timeout(10):
        await second  # the slot went on to the next in line instead of being lost
    assert queue.stats().active == 1 and queue.stats().waiting == 0


async def test_the_context_manager_releases_on_error_and_retry_after_follows_the_queue() -> None:
    now = [0.0]
    queue = SlotQueue(1, queue_size=8, max_wait_seconds=60, clock=lambda: now[0])
    for _ in range(8):  # each hold lasts 10 s of the injected clock
        async with queue.slot():
            now[0] += 10
    with pytest.raises(RuntimeError):
        async with queue.slot():
            raise RuntimeError("generation failed")
    assert queue.stats().active == 0
    assert 5 <= queue.retry_after_seconds() <= 10  # about one hold ahead
    await queue.acquire()
    waiters = [asyncio.create_task(queue.acquire()) for _ in range(3)]
    await _wait_until(lambda: queue.stats().waiting == 3)
    assert queue.retry_after_seconds() > 20  # four holds ahead, capped at a minute
    assert queue.retry_after_seconds() <= 60
    for task in waiters:
        task.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)


def test_bounds_are_validated() -> None:
    with pytest.raises(ValueError):
        SlotQueue(0, queue_size=1, max_wait_seconds=1)
    with pytest.raises(ValueError):
        SlotQueue(1, queue_size=-1, max_wait_seconds=1)
