"""The retry budget's token bucket, on an injected clock."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from microapp.platform.retry_budget import RetryBudget, RetryBudgetSnapshot
from tests.support.clock import FakeClock

T = TypeVar("T")
# The refill arithmetic is float: the steps below add up exactly from this start.
START = 500.0


def drain(budget: RetryBudget) -> int:
    taken = 0
    while budget.try_acquire():
        taken += 1
    return taken


def test_a_new_budget_holds_its_capacity() -> None:
    budget = RetryBudget(20, 10.0, clock=FakeClock(START))
    assert budget.tokens == 20
    assert drain(budget) == 20


def test_an_empty_budget_refuses_without_waiting() -> None:
    budget = RetryBudget(20, 10.0, clock=FakeClock(START))
    drain(budget)
    assert budget.try_acquire() is False
    assert budget.tokens == 0


def test_tokens_refill_at_the_rate() -> None:
    clock = FakeClock(START)
    budget = RetryBudget(20, 10.0, clock=clock)
    drain(budget)
    clock.now += 0.35
    assert drain(budget) == 3
    clock.now += 0.05  # 0.5 of a token carried over plus 0.5
    assert drain(budget) == 1


def test_refill_never_exceeds_capacity() -> None:
    clock = FakeClock(START)
    budget = RetryBudget(20, 10.0, clock=clock)
    drain(budget)
    clock.now += 3600
    assert budget.tokens == 20
    assert drain(budget) == 20


def test_acquired_over_time_is_bounded_by_capacity_plus_refill() -> None:
    clock = FakeClock(START)
    budget = RetryBudget(20, 10.0, clock=clock)
    taken = 0
    for _ in range(3000):  # 3 s of very eager retriers, one try per millisecond
        taken += budget.try_acquire()
        clock.now += 0.001
    assert taken <= 20 + 10 * 3
    assert taken >= 20 + 10 * 3 - 1


def test_zero_capacity_never_retries() -> None:
    clock = FakeClock(START)
    budget = RetryBudget(0, 10.0, clock=clock)
    clock.now += 10
    assert budget.try_acquire() is False


def in_thread(read: Callable[[], T]) -> T:
    """`read()` run on a thread of its own, as OpenTelemetry's exporter runs the gauges."""
    results: list[T] = []
    thread = threading.Thread(target=lambda: results.append(read()))
    thread.start()
    thread.join()
    return results[0]


def test_a_snapshot_counts_the_refill_without_storing_it() -> None:
    clock = FakeClock(START)
    budget = RetryBudget(20, 10.0, clock=clock)
    drain(budget)
    stored = budget._bucket
    clock.now += 0.25
    assert in_thread(budget.snapshot) == RetryBudgetSnapshot(tokens=2.5, capacity=20)
    assert in_thread(lambda: budget.tokens) == 2
    assert budget._bucket is stored  # the bucket was not refilled by looking


def test_snapshots_from_another_thread_leave_what_is_acquired_unchanged() -> None:
    # The same steps as test_tokens_refill_at_the_rate, with snapshots taken between
    # them: the tokens acquired are exactly the same.
    clock = FakeClock(START)
    budget = RetryBudget(20, 10.0, clock=clock)
    drain(budget)
    clock.now += 0.35
    for _ in range(5):
        in_thread(budget.snapshot)
    assert drain(budget) == 3
    clock.now += 0.05
    assert in_thread(budget.snapshot).whole_tokens == 1
    assert drain(budget) == 1


def test_a_snapshot_never_reads_more_than_capacity() -> None:
    clock = FakeClock(START)
    budget = RetryBudget(20, 10.0, clock=clock)
    clock.now += 3600
    assert in_thread(budget.snapshot) == RetryBudgetSnapshot(tokens=20.0, capacity=20)
