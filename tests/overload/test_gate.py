"""The admission gate on its own: a bounded number of slots, a bounded FIFO queue in front of them,
refusal (Overloaded, with Retry-After) past the queue or past the longest wait, and a slot that
passes to the next waiter exactly once however its holder ends. Driven step by step: no sleeps."""

from __future__ import annotations

import asyncio

import pytest

from companion.api.admission import is_turn
from companion.errors import Overloaded
from companion.overload.admission import Admission, Gate, Permit


async def _queued(gate: Gate, count: int) -> None:
    """Let waiting acquirers reach the queue (each needs a loop turn to start)."""
    for _ in range(100):
        if gate.waiting >= count:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{count} waiters expected, {gate.waiting} queued")


async def test_admits_up_to_the_limit_queues_up_to_the_queue_and_refuses_the_rest() -> None:
    gate = Gate("turns", limit=2, queue=1, max_wait=60)
    first, second = await gate.acquire(), await gate.acquire()
    third = asyncio.create_task(gate.acquire())
    await _queued(gate, 1)
    with pytest.raises(Overloaded) as refused:
        await gate.acquire()
    assert refused.value.code == "overloaded" and refused.value.status_code == 503
    assert refused.value.retry_after >= 1
    assert (gate.in_flight, gate.waiting) == (2, 1)
    first.release()
    permit = await third
    assert (gate.in_flight, gate.waiting) == (2, 0)
    for held in (second, permit):
        held.release()
    assert gate.in_flight == 0
    stats = gate.stats
    assert (stats.admitted, stats.queued, stats.shed_full, stats.shed_timeout) == (3, 1, 1, 0)
    assert sum(stats.wait_buckets) == 1


async def test_waiters_are_admitted_first_come_first_served() -> None:
    gate = Gate("turns", limit=1, queue=3, max_wait=60)
    holder = await gate.acquire()
    order: list[int] = []

    async def wait(index: int) -> Permit:
        permit = await gate.acquire()
        order.append(index)
        return permit

    tasks = []
    for index in range(3):
        tasks.append(asyncio.create_task(wait(index)))
        await _queued(gate, index + 1)
    holder.release()
    for task in tasks:
        (await task).release()
    assert order == [0, 1, 2]
    assert gate.in_flight == 0


async def test_a_newcomer_does_not_overtake_the_queue() -> None:
    gate = Gate("turns", limit=1, queue=2, max_wait=60)
    holder = await gate.acquire()
    waiter = asyncio.create_task(gate.acquire())
    await _queued(gate, 1)
    holder.release()  # the slot goes to the waiter, not to whoever asks next
    newcomer = asyncio.create_task(gate.acquire())
    await _queued(gate, 1)
    assert not newcomer.done()
    (await waiter).release()
    (await newcomer).release()
    assert gate.in_flight == 0


async def test_a_request_that_waits_past_the_longest_wait_is_refused() -> None:
    gate = Gate("turns", limit=1, queue=5, max_wait=0)
    holder = await gate.acquire()
    with pytest.raises(Overloaded):
        await gate.acquire()
    assert (gate.stats.shed_timeout, gate.waiting, gate.in_flight) == (1, 0, 1)
    holder.release()
    assert gate.in_flight == 0


async def test_a_waiter_that_is_cancelled_leaves_the_queue_and_loses_nothing() -> None:
    gate = Gate("turns", limit=1, queue=2, max_wait=60)
    holder = await gate.acquire()
    leaving = asyncio.create_task(gate.acquire())
    staying = asyncio.create_task(gate.acquire())
    await _queued(gate, 2)
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert gate.waiting == 1
    holder.release()
    (await staying).release()
    assert gate.in_flight == 0


async def test_a_waiter_cancelled_just_after_being_handed_the_slot_passes_it_on() -> None:
    gate = Gate("turns", limit=1, queue=2, max_wait=60)
    holder = await gate.acquire()
    unlucky = asyncio.create_task(gate.acquire())
    next_in_line = asyncio.create_task(gate.acquire())
    await _queued(gate, 2)
    holder.release()  # hands the slot to `unlucky`, whose task has not run yet
    unlucky.cancel()
    with pytest.raises(asyncio.CancelledError):
        await unlucky
    (await next_in_line).release()
    assert gate.in_flight == 0


async def test_release_is_idempotent_and_a_handed_over_permit_is_released_by_its_new_holder() -> None:
    gate = Gate("turns", limit=1, queue=0, max_wait=0)
    async with gate.admit() as permit:
        release = permit.hand_over()
    assert gate.in_flight == 1  # the block ended, but the slot is now the new holder's
    release()
    release()
    permit.release()
    assert gate.in_flight == 0
    async with gate.admit():
        assert gate.in_flight == 1
    assert gate.in_flight == 0


async def test_retry_after_grows_with_the_queue_and_the_time_slots_are_held() -> None:
    now = [0.0]
    gate = Gate("turns", limit=1, queue=10, max_wait=60, clock=lambda: now[0])
    for _ in range(30):  # slots held 4 s each, lately
        permit = await gate.acquire()
        now[0] += 4.0
        permit.release()
    holder = await gate.acquire()
    assert gate.retry_after() >= 3
    waiters = [asyncio.create_task(gate.acquire()) for _ in range(5)]
    await _queued(gate, 5)
    assert gate.retry_after() >= 5 * 3
    holder.release()
    for waiter in waiters:
        (await waiter).release()


def test_admission_builds_one_gate_for_turns_and_one_for_other_requests() -> None:
    admission = Admission.build(max_turns=3, turn_queue=4, max_requests=5, request_queue=6, queue_timeout=1.5)
    assert (admission.turns.limit, admission.turns.queue, admission.turns.max_wait) == (3, 4, 1.5)
    assert (admission.requests.limit, admission.requests.queue) == (5, 6)
    assert set(admission.gates()) == {"turn", "other"}
    with pytest.raises(ValueError):
        Gate("bad", limit=0, queue=0, max_wait=0)


async def test_a_request_that_would_wait_longer_than_the_longest_wait_is_refused_at_once() -> None:
    now = [0.0]
    gate = Gate("turns", limit=2, queue=100, max_wait=10, clock=lambda: now[0])
    for _ in range(20):  # slots have been held 4 s each: two slots free one every 2 s
        permits = [await gate.acquire(), await gate.acquire()]
        now[0] += 4.0
        for permit in permits:
            permit.release()
    holders = [await gate.acquire(), await gate.acquire()]
    waiters = []
    for _ in range(4):  # waits of 2, 4, 6, 8 s ahead: queued
        waiters.append(asyncio.create_task(gate.acquire()))
        await _queued(gate, len(waiters))
    assert gate.expected_wait() == pytest.approx(10.0)
    waiters.append(asyncio.create_task(gate.acquire()))  # 10 s: still within the longest wait
    await _queued(gate, 5)
    with pytest.raises(Overloaded):  # 12 s: refused now rather than after waiting 10
        await gate.acquire()
    assert (gate.stats.shed_full, gate.stats.shed_timeout, gate.waiting) == (1, 0, 5)
    for permit in holders:
        permit.release()
    for waiter in waiters:
        (await waiter).release()
    assert gate.in_flight == 0


@pytest.mark.parametrize(
    ("method", "path", "turn"),
    [
        ("POST", "/v1/conversations/c1/messages", True),
        ("POST", "/v1/chat/completions", True),
        ("POST", "/v1/conversations/c1/messages/7/regenerate", True),
        ("POST", "/v1/conversations/c1/messages/7/edit", True),
        ("GET", "/v1/conversations/c1/messages", False),
        ("POST", "/v1/conversations/c1/messages/7/stop", False),
        ("POST", "/v1/conversations/c1/messages/7/activate", False),
        ("GET", "/v1/conversations/c1/messages/7/stream", False),
        ("POST", "/v1/conversations", False),
    ],
)
def test_the_routes_that_start_a_turn_take_a_turn_slot(method: str, path: str, turn: bool) -> None:
    assert is_turn(method, path) is turn
