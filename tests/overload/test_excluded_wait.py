"""A wait in one of our own queues (a pooled Redis connection) does not count against the
operation's timeout: the pool bounds that wait itself, and a slow queue is this process being busy,
not Redis being down."""

from __future__ import annotations

import asyncio

import pytest

from companion.overload.loop import LagTolerantTimeout, excluded_wait


async def test_time_in_an_excluded_wait_is_not_counted() -> None:
    async with LagTolerantTimeout(None, 0.05, cap=0.3):
        with excluded_wait():
            await asyncio.sleep(0.6)  # twice the hard cap: it would have expired, had it counted


async def test_the_same_wait_outside_an_excluded_wait_times_out() -> None:
    with pytest.raises(TimeoutError):
        async with LagTolerantTimeout(None, 0.05, cap=0.3):
            await asyncio.sleep(0.6)


async def test_time_after_an_excluded_wait_counts_again() -> None:
    with pytest.raises(TimeoutError):
        async with LagTolerantTimeout(None, 0.05, cap=0.3):
            with excluded_wait():
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.6)


async def test_outside_any_timeout_it_does_nothing() -> None:
    with excluded_wait():
        await asyncio.sleep(0)
