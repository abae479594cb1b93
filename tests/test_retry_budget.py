"""The retry budget's token bucket, on an injected clock."""

from __future__ import annotations

from microapp.platform.retry_budget import RetryBudget


class FakeClock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def drain(budget: RetryBudget) -> int:
    taken = 0
    while budget.try_acquire():
        taken += 1
    return taken


def test_a_new_budget_holds_its_capacity() -> None:
    budget = RetryBudget(20, 10.0, clock=FakeClock())
    assert budget.tokens == 20
    assert drain(budget) == 20


def test_an_empty_budget_refuses_without_waiting() -> None:
    budget = RetryBudget(20, 10.0, clock=FakeClock())
    drain(budget)
    assert budget.try_acquire() is False
    assert budget.tokens == 0


def test_tokens_refill_at_the_rate() -> None:
    clock = FakeClock()
    budget = RetryBudget(20, 10.0, clock=clock)
    drain(budget)
    clock.now += 0.35
    assert drain(budget) == 3
    clock.now += 0.05  # 0.5 of a token carried over plus 0.5
    assert drain(budget) == 1


def test_refill_never_exceeds_capacity() -> None:
    clock = FakeClock()
    budget = RetryBudget(20, 10.0, clock=clock)
    drain(budget)
    clock.now += 3600
    assert budget.tokens == 20
    assert drain(budget) == 20


def test_acquired_over_time_is_bounded_by_capacity_plus_refill() -> None:
    clock = FakeClock()
    budget = RetryBudget(20, 10.0, clock=clock)
    taken = 0
    for _ in range(3000):  # 3 s of very eager retriers, one try per millisecond
        taken += budget.try_acquire()
        clock.now += 0.001
    assert taken <= 20 + 10 * 3
    assert taken >= 20 + 10 * 3 - 1


def test_zero_capacity_never_retries() -> None:
    clock = FakeClock()
    budget = RetryBudget(0, 10.0, clock=clock)
    clock.now += 10
    assert budget.try_acquire() is False
