"""Run a CPU-bound call in a child process with a time bound that fails the test, for properties
like "this parse is linear": a pathological input must fail the run, not hang it."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

T = TypeVar("T")


def run_within(seconds: float, function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` in a fresh process (spawned: nothing of this one is shared); the test fails
    if it has not returned after `seconds`, and the process is killed. The bound is generous on
    purpose: it tells "finishes" from "never finishes", it measures nothing."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        pending = pool.apply_async(function, args)
        try:
            return pending.get(timeout=seconds)
        except multiprocessing.TimeoutError:
            pool.terminate()
            pytest.fail(f"{getattr(function, '__name__', function)} did not finish within {seconds} s")
