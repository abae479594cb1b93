"""The circuit breaker's rules, on an injected clock: exact, fast, no sleeping.

The last part pins the gateway's arithmetic: each attempt (a call, and its retry) is one
breaker outcome, and a retry runs only when the breaker admits it and the budget has a
token. Its custom-lang is a scripted stand-in here; test_gateway.py shows the same against
a real custom-lang process.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import TypeVar

import pytest
from connectrpc.code import Code

from microapp.platform.breaker import BreakerOpenError, BreakerSnapshot, CircuitBreaker
from microapp.platform.retry_budget import RetryBudget
from microapp.services.gateway.downstream import Reply
from microapp.services.gateway.service import ResilientInvoker
from tests.support.clock import FakeClock

T = TypeVar("T")


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


# --- snapshots: read from another thread, they change nothing ---------------------------


def in_thread(read: Callable[[], T]) -> T:
    """`read()` run on a thread of its own, as OpenTelemetry's exporter runs the gauges."""
    results: list[T] = []
    thread = threading.Thread(target=lambda: results.append(read()))
    thread.start()
    thread.join()
    return results[0]


async def test_a_snapshot_reads_an_over_open_period_as_half_open_without_moving_it(
    clock: FakeClock, downstream: Downstream, caplog: pytest.LogCaptureFixture
):
    breaker = make_breaker(clock)
    await open_breaker(breaker, downstream)
    clock.advance(30.0)
    caplog.clear()  # the opening's own line
    with caplog.at_level(logging.INFO, logger="microapp.platform.breaker"):
        stored = breaker.storage.record
        seen = in_thread(breaker.snapshot)
        # 30 s on, the 10 s window of the five failures has ended too: they read as none.
        assert seen == BreakerSnapshot(
            state="half_open", consecutive_failures=0, seconds_until_half_open=0.0
        )
        assert breaker.storage.record is stored
        # Internally it is still open: no transition, no log line, until a call arrives.
        assert breaker.current_state.name == "OPEN"
        assert not [r for r in caplog.records if hasattr(r, "to_state")]
        await breaker.run(downstream.ok)
    assert [(r.from_state, r.to_state) for r in caplog.records if hasattr(r, "to_state")] == [
        ("open", "half_open")
    ]


async def test_a_snapshot_of_an_open_breaker_says_how_long_it_stays_open(
    clock: FakeClock, downstream: Downstream
):
    breaker = make_breaker(clock)
    await open_breaker(breaker, downstream)
    clock.advance(5.0)
    assert in_thread(breaker.snapshot) == BreakerSnapshot("open", 5, 25.0)


async def test_a_snapshot_reads_an_ended_window_as_zero_without_starting_a_new_one(
    clock: FakeClock, downstream: Downstream
):
    breaker = make_breaker(clock)
    await fail_times(breaker, downstream, 4)
    stored = breaker.storage.record
    clock.advance(15.0)  # the window that began at 1000 ended at 1010
    assert in_thread(breaker.snapshot).consecutive_failures == 0
    assert breaker.storage.record is stored  # not even rewritten with equal values
    # The next failure is the first of a window that begins now (1015), not at 1010:
    # four more, 9.9 s later, still leave it closed.
    await fail_times(breaker, downstream, 1)
    clock.advance(9.9)
    await fail_times(breaker, downstream, 3)
    assert breaker.state_name == "closed"
    assert breaker.consecutive_failures == 4


async def test_reading_state_name_and_failures_changes_nothing(
    clock: FakeClock, downstream: Downstream
):
    breaker = make_breaker(clock)
    await open_breaker(breaker, downstream)
    clock.advance(30.0)
    stored = breaker.storage.record
    assert in_thread(lambda: (breaker.state_name, breaker.consecutive_failures)) == (
        "half_open",
        0,
    )
    assert breaker.storage.record is stored


async def test_snapshots_taken_while_the_loop_works_are_always_whole(
    clock: FakeClock, downstream: Downstream
):
    breaker = make_breaker(clock)
    stop = threading.Event()
    seen: list[BreakerSnapshot] = []

    def reader() -> None:
        while not stop.is_set():
            seen.append(breaker.snapshot())

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(200):
            await open_breaker(breaker, downstream)
            clock.advance(30.0)
            for _ in range(3):
                await breaker.run(downstream.ok)
            await asyncio.sleep(0)  # let the reader's thread in between rounds
    finally:
        stop.set()
        thread.join()
    assert seen
    for snap in seen:
        assert snap.state in {"closed", "open", "half_open"}
        assert 0 <= snap.consecutive_failures <= 5
        # An open snapshot always carries the period it is open for, never a stale zero.
        assert (snap.state == "open") == (snap.seconds_until_half_open > 0)


# --- the gateway's arithmetic: each attempt is one breaker outcome -----------------------


class ScriptedCustomLang:
    """Answers every invocation with `status`, counting the attempts that reached it."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.attempts = 0

    async def invoke(self, name: str) -> Reply:
        self.attempts += 1
        ok = 200 <= self.status < 300
        return Reply(self.status, f"Hello {name}" if ok else f"HTTP {self.status} for {name}")


def make_invoker(
    clock: FakeClock, lang: ScriptedCustomLang, *, capacity: int = 20
) -> tuple[ResilientInvoker, CircuitBreaker, RetryBudget]:
    breaker = make_breaker(clock)
    budget = RetryBudget(capacity, 10.0, clock=clock)
    return ResilientInvoker(lang, breaker, budget), breaker, budget


async def test_each_attempt_counts_so_a_503_opens_it_on_the_third_invocation(clock: FakeClock):
    lang = ScriptedCustomLang(503)
    invoker, breaker, budget = make_invoker(clock, lang)
    for expected_failures in (2, 4):  # a call and its retry: two outcomes
        outcome = await invoker.invoke("x")
        assert outcome.code == Code.UNAVAILABLE
        assert breaker.snapshot() == BreakerSnapshot("closed", expected_failures, 0.0)
    assert lang.attempts == 4

    third = await invoker.invoke("x")
    # Its first attempt is the fifth failure and opens the breaker, which refuses the retry:
    # the answer is that attempt's own 503, and no token is spent on a retry never sent.
    assert third.code == Code.UNAVAILABLE
    assert third.message == "HTTP 503 for x"
    assert lang.attempts == 5
    assert breaker.state_name == "open"
    assert budget.tokens == 18

    fourth = await invoker.invoke("x")
    assert fourth.code == Code.UNAVAILABLE
    assert "custom-lang not called" in fourth.message
    assert lang.attempts == 5


async def test_without_retry_tokens_each_invocation_is_one_attempt(clock: FakeClock):
    lang = ScriptedCustomLang(503)
    invoker, breaker, _ = make_invoker(clock, lang, capacity=0)
    for _ in range(4):
        await invoker.invoke("x")
    assert breaker.snapshot() == BreakerSnapshot("closed", 4, 0.0)
    await invoker.invoke("x")
    assert breaker.state_name == "open"
    assert lang.attempts == 5


async def test_a_failed_half_open_trial_is_not_retried(clock: FakeClock):
    lang = ScriptedCustomLang(503)
    invoker, breaker, budget = make_invoker(clock, lang)
    for _ in range(3):
        await invoker.invoke("x")
    clock.advance(30.0)
    tokens, attempts = budget.tokens, lang.attempts
    outcome = await invoker.invoke("x")
    # The trial's failure reopened the breaker at once; its retry would be refused, so it
    # is not sent and costs no token.
    assert outcome.message == "HTTP 503 for x"
    assert lang.attempts == attempts + 1
    assert budget.tokens == tokens
    # Its failure is the first of a new window (the old one ended during the open period).
    assert breaker.snapshot() == BreakerSnapshot("open", 1, 30.0)


async def test_half_open_trials_are_attempts_three_good_ones_close_it(clock: FakeClock):
    lang = ScriptedCustomLang(503)
    invoker, breaker, _ = make_invoker(clock, lang)
    for _ in range(3):
        await invoker.invoke("x")
    clock.advance(30.0)
    lang.status = 200
    for remaining in ("half_open", "half_open", "closed"):
        assert (await invoker.invoke("y")).success
        assert breaker.state_name == remaining
    assert breaker.consecutive_failures == 0


async def test_a_retry_that_succeeds_ends_the_run_of_failures(clock: FakeClock):
    lang = FlakyCustomLang()
    invoker, breaker, _ = make_invoker(clock, lang)
    outcome = await invoker.invoke("z")
    assert outcome.success
    assert lang.attempts == 2
    assert breaker.snapshot() == BreakerSnapshot("closed", 0, 0.0)


async def test_a_4xx_answer_is_one_success_and_never_retried(clock: FakeClock):
    lang = ScriptedCustomLang(404)
    invoker, breaker, budget = make_invoker(clock, lang)
    for _ in range(10):
        assert (await invoker.invoke("nobody")).code == Code.NOT_FOUND
    assert lang.attempts == 10
    assert breaker.snapshot() == BreakerSnapshot("closed", 0, 0.0)
    assert budget.tokens == 20


class FlakyCustomLang(ScriptedCustomLang):
    """503 on odd attempts, 200 on even ones: every first attempt fails, every retry works."""

    def __init__(self) -> None:
        super().__init__(503)

    async def invoke(self, name: str) -> Reply:
        self.status = 503 if self.attempts % 2 == 0 else 200
        return await super().invoke(name)
