"""The circuit breaker's rules, on an injected clock: exact, fast, no sleeping."""

from __future__ import annotations

import asyncio
import logging

import pytest

from microapp.platform.breaker import BreakerOpenError, CircuitBreaker


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class DownstreamFailed(Exception):
    """Stands for a timeout, a connection error, a 5xx or a 429."""


class Answered4xx(Exception):
    """Stands for a 4xx answer other than 429: an answer, not a failure."""


class Downstream:
    """Counts the calls that reached it."""

    def __init__(self) -> None:
        self.calls = 0

    async def ok(self) -> str:
        self.calls += 1
        return "ok"

    async def fail(self) -> str:
        self.calls += 1
        raise DownstreamFailed("503")

    async def answer_404(self) -> str:
        self.calls += 1
        raise Answered4xx("404")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def downstream() -> Downstream:
    return Downstream()


def make_breaker(clock: FakeClock) -> CircuitBreaker:
    return CircuitBreaker(
        failure_threshold=5,
        interval_s=10.0,
        open_s=30.0,
        half_open_max=3,
        clock=clock,
        name="test",
        exclude=[Answered4xx],
    )


async def fail_times(breaker: CircuitBreaker, downstream: Downstream, n: int) -> None:
    for _ in range(n):
        with pytest.raises(DownstreamFailed):
            await breaker.run(downstream.fail)


async def open_breaker(breaker: CircuitBreaker, downstream: Downstream) -> None:
    await fail_times(breaker, downstream, 5)
    assert breaker.state_name == "open"


async def test_four_consecutive_failures_leave_it_closed(clock: FakeClock, downstream: Downstream):
    breaker = make_breaker(clock)
    await fail_times(breaker, downstream, 4)
    assert breaker.state_name == "closed"
    assert breaker.consecutive_failures == 4


async def test_fifth_consecutive_failure_opens_it(clock: FakeClock, downstream: Downstream):
    breaker = make_breaker(clock)
    await fail_times(breaker, downstream, 4)
    # The tripping call raises its own failure, not aiobreaker's CircuitBreakerError.
    with pytest.raises(DownstreamFailed):
        await breaker.run(downstream.fail)
    assert breaker.state_name == "open"


async def test_a_success_resets_the_run_of_failures(clock: FakeClock, downstream: Downstream):
    breaker = make_breaker(clock)
    await fail_times(breaker, downstream, 4)
    assert await breaker.run(downstream.ok) == "ok"
    assert breaker.consecutive_failures == 0
    await fail_times(breaker, downstream, 4)
    assert breaker.state_name == "closed"


async def test_failure_count_is_cleared_after_the_interval(
    clock: FakeClock, downstream: Downstream
):
    breaker = make_breaker(clock)
    await fail_times(breaker, downstream, 4)
    clock.advance(10.0)
    assert breaker.consecutive_failures == 0
    await fail_times(breaker, downstream, 4)
    assert breaker.state_name == "closed"


async def test_failure_count_is_kept_within_the_interval(clock: FakeClock, downstream: Downstream):
    breaker = make_breaker(clock)
    await fail_times(breaker, downstream, 4)
    clock.advance(9.9)
    await fail_times(breaker, downstream, 1)
    assert breaker.state_name == "open"


async def test_open_breaker_rejects_without_calling(clock: FakeClock, downstream: Downstream):
    breaker = make_breaker(clock)
    await open_breaker(breaker, downstream)
    calls = downstream.calls
    clock.advance(29.9)
    with pytest.raises(BreakerOpenError):
        await breaker.run(downstream.ok)
    assert downstream.calls == calls
    assert not breaker.admits()


async def test_open_period_over_makes_it_half_open(clock: FakeClock, downstream: Downstream):
    breaker = make_breaker(clock)
    await open_breaker(breaker, downstream)
    clock.advance(30.0)
    assert breaker.state_name == "half_open"
    assert breaker.admits()


async def test_half_open_admits_three_concurrent_trials_and_rejects_the_fourth(
    clock: FakeClock, downstream: Downstream
):
    breaker = make_breaker(clock)
    await open_breaker(breaker, downstream)
    clock.advance(30.0)
    release = asyncio.Event()
    started = 0

    async def slow_ok() -> str:
        nonlocal started
        started += 1
        await release.wait()
        return "ok"

    trials = [asyncio.create_task(breaker.run(slow_ok)) for _ in range(3)]
    await asyncio.sleep(0)  # let the three trials start
    assert started == 3
    assert not breaker.admits()
    with pytest.raises(BreakerOpenError):
        await breaker.run(downstream.ok)
    assert downstream.calls == 5  # only the five failures that opened it
    release.set()
    assert await asyncio.gather(*trials) == ["ok", "ok", "ok"]


async def test_three_successes_in_half_open_close_it(clock: FakeClock, downstream: Downstream):
    breaker = make_breaker(clock)
    await open_breaker(breaker, downstream)
    clock.advance(30.0)
    await breaker.run(downstream.ok)
    await breaker.run(downstream.ok)
    assert breaker.state_name == "half_open"
    await breaker.run(downstream.ok)
    assert breaker.state_name == "closed"
    assert breaker.consecutive_failures == 0


async def test_a_failure_in_half_open_reopens_it(clock: FakeClock, downstream: Downstream):
    breaker = make_breaker(clock)
    await open_breaker(breaker, downstream)
    clock.advance(30.0)
    await breaker.run(downstream.ok)
    with pytest.raises(DownstreamFailed):
        await breaker.run(downstream.fail)
    assert breaker.state_name == "open"
    clock.advance(29.9)
    assert breaker.state_name == "open"
    clock.advance(0.1)
    assert breaker.state_name == "half_open"


async def test_4xx_answers_never_trip_it(clock: FakeClock, downstream: Downstream):
    breaker = make_breaker(clock)
    for _ in range(20):
        with pytest.raises(Answered4xx):
            await breaker.run(downstream.answer_404)
    assert breaker.state_name == "closed"
    assert breaker.consecutive_failures == 0


async def test_a_4xx_answer_breaks_the_run_of_failures(clock: FakeClock, downstream: Downstream):
    breaker = make_breaker(clock)
    await fail_times(breaker, downstream, 4)
    with pytest.raises(Answered4xx):
        await breaker.run(downstream.answer_404)
    await fail_times(breaker, downstream, 4)
    assert breaker.state_name == "closed"


async def test_a_cancelled_trial_gives_its_half_open_slot_back(
    clock: FakeClock, downstream: Downstream
):
    breaker = make_breaker(clock)
    await open_breaker(breaker, downstream)
    clock.advance(30.0)
    never = asyncio.Event()

    async def hang() -> str:
        await never.wait()
        return "never"

    trials = [asyncio.create_task(breaker.run(hang)) for _ in range(3)]
    await asyncio.sleep(0)
    assert not breaker.admits()
    trials[0].cancel()
    with pytest.raises(asyncio.CancelledError):
        await trials[0]
    assert breaker.admits()
    for trial in trials[1:]:
        trial.cancel()
    await asyncio.gather(*trials[1:], return_exceptions=True)


async def test_a_late_failure_begun_before_the_breaker_opened_does_not_extend_it(
    clock: FakeClock, downstream: Downstream
):
    breaker = make_breaker(clock)
    finish = asyncio.Event()

    async def slow_fail() -> str:
        await finish.wait()
        raise DownstreamFailed("late")

    late = asyncio.create_task(breaker.run(slow_fail))
    await asyncio.sleep(0)
    await open_breaker(breaker, downstream)
    clock.advance(20.0)
    finish.set()
    with pytest.raises(DownstreamFailed):
        await late
    clock.advance(10.0)  # 30 s after it opened, not after the late failure
    assert breaker.state_name == "half_open"


async def test_state_changes_are_logged(
    clock: FakeClock, downstream: Downstream, caplog: pytest.LogCaptureFixture
):
    breaker = make_breaker(clock)
    with caplog.at_level(logging.INFO, logger="microapp.platform.breaker"):
        await open_breaker(breaker, downstream)
        clock.advance(30.0)
        for _ in range(3):
            await breaker.run(downstream.ok)
    changes = [(r.from_state, r.to_state) for r in caplog.records if hasattr(r, "to_state")]
    assert changes == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
