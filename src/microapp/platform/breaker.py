"""A circuit breaker built on aiobreaker, with the seed's (gobreaker's) semantics.

aiobreaker gives the state machine, listeners and state storage. Its own half-open state
lets every call through and closes on the first success, it never forgets old failures,
and it reads the wall clock. This module extends it through its seams:

- `ClockedStorage` (its state storage) clears the closed state's failure count every
  `interval_s` and keeps `opened_at` in seconds of an injected monotonic clock;
- state subclasses make the open period follow that clock, admit at most
  `half_open_max` trial calls in half-open (as many successes close it, any failure
  reopens it), and ignore the late outcome of a call begun in an earlier state;
- a listener logs every state change;
- `snapshot()` computes what the breaker reads as at a moment without changing it, so
  OpenTelemetry's exporter thread and `/debug/breaker` may read it from anywhere.

The storage keeps its whole state in one frozen record that only the event loop replaces;
a reader from another thread takes that one reference and computes from it, so it never
sees half of an update and never writes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, NoReturn, Protocol, TypeVar, cast

# aiobreaker ships neither stubs nor py.typed: its types are inferred from its source,
# partly unannotated (the `reportUnknownMemberType` ignores below) and partly wrong (the
# others, each with its reason).
import aiobreaker  # pyright: ignore[reportMissingTypeStubs]
from aiobreaker import (  # pyright: ignore[reportMissingTypeStubs]
    CircuitBreakerError,
    CircuitBreakerListener,
    CircuitBreakerState,
)
from aiobreaker.state import (  # pyright: ignore[reportMissingTypeStubs]
    CircuitBreakerBaseState,
    CircuitClosedState,
    CircuitHalfOpenState,
    CircuitOpenState,
)
from aiobreaker.storage.base import (  # pyright: ignore[reportMissingTypeStubs]
    CircuitBreakerStorage,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
Clock = Callable[[], float]

STATE_NAMES = {
    CircuitBreakerState.CLOSED: "closed",
    CircuitBreakerState.OPEN: "open",
    CircuitBreakerState.HALF_OPEN: "half_open",
}


class BreakerOpenError(CircuitBreakerError):
    """The breaker refused a call without running it: open, or half-open with every
    trial slot taken."""

    def __init__(self, message: str, reopen_time: datetime | None) -> None:
        # None when no time is known (half-open); aiobreaker annotates it as always a time.
        super().__init__(message, reopen_time)  # pyright: ignore[reportArgumentType]

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class StoredState:
    """Everything the storage holds, as one immutable value.

    `window_ends` is when the failure count stops counting (None: never).
    """

    state: CircuitBreakerState
    opened_at: float | None
    failures: int
    window_ends: float | None

    def window_over(self, now: float) -> bool:
        """Whether the failure count's window has ended by `now`."""
        return self.window_ends is not None and now >= self.window_ends

    def failures_at(self, now: float) -> int:
        """The failure count as it reads at `now`: zero once its window is over."""
        return 0 if self.window_over(now) else self.failures


class ClockedStorage(CircuitBreakerStorage):
    """aiobreaker's state storage, in memory, on an injected clock.

    The failure count lives in windows of `interval_s` seconds (0: one endless window)
    that begin when the breaker closes; a count older than its window reads as zero.
    `opened_at` is in the clock's seconds, not a datetime. Every change replaces
    `record` whole; reading never changes it.
    """

    def __init__(self, clock: Clock, interval_s: float) -> None:
        super().__init__("memory")
        self._clock = clock
        self._interval_s = interval_s
        self.record = StoredState(CircuitBreakerState.CLOSED, None, 0, self._window_end())

    def _window_end(self) -> float | None:
        return self._clock() + self._interval_s if self._interval_s > 0 else None

    def start_window(self) -> None:
        """Forget the failures counted so far and start a new counting window."""
        self.record = replace(self.record, failures=0, window_ends=self._window_end())

    @property
    def state(self) -> CircuitBreakerState:
        return self.record.state

    @state.setter
    def state(self, state: CircuitBreakerState) -> None:
        self.record = replace(self.record, state=state)

    # Seconds on the injected clock where aiobreaker keeps a datetime: only our own
    # breaker below reads it, so the override's other type is deliberate.
    @property
    def opened_at(self) -> float | None:  # pyright: ignore[reportIncompatibleMethodOverride]
        return self.record.opened_at

    @opened_at.setter
    def opened_at(self, opened_at: float | None) -> None:  # pyright: ignore[reportIncompatibleMethodOverride]
        self.record = replace(self.record, opened_at=opened_at)

    def set_open(self) -> None:
        """Open as of now, in one replacement (a reader never sees open without a time)."""
        self.record = replace(self.record, state=CircuitBreakerState.OPEN, opened_at=self._clock())

    def set_closed(self) -> None:
        """Closed, no failures, a new window, in one replacement."""
        self.record = replace(
            self.record,
            state=CircuitBreakerState.CLOSED,
            failures=0,
            window_ends=self._window_end(),
        )

    def increment_counter(self) -> None:
        # A failure after the window ended is the first of a new window.
        if self.record.window_over(self._clock()):
            self.start_window()
        self.record = replace(self.record, failures=self.record.failures + 1)

    def reset_counter(self) -> None:
        self.record = replace(self.record, failures=0)

    @property
    def counter(self) -> int:
        return self.record.failures_at(self._clock())


class _CurrentStateOnly(CircuitBreakerBaseState):
    """Outcomes count only while the state that admitted the call is still current.

    A call begun while closed may end after the breaker opened (or closed again); like
    gobreaker's generations, its outcome must not move the new state.
    """

    _breaker: CircuitBreaker

    def _is_current(self) -> bool:
        # aiobreaker has no public accessor of the state object itself.
        return self._breaker._state is self  # pyright: ignore[reportPrivateUsage]

    def _handle_error(self, func: Any, exception: Exception) -> NoReturn:
        if not self._is_current():
            raise exception
        super()._handle_error(func, exception)  # pyright: ignore[reportUnknownMemberType]

    def _handle_success(self) -> None:
        if self._is_current():
            super()._handle_success()


class _ClosedState(_CurrentStateOnly, CircuitClosedState):
    def __init__(self, breaker: CircuitBreaker, prev_state: Any = None, notify: bool = False):
        super().__init__(breaker, prev_state, notify)  # pyright: ignore[reportUnknownMemberType]
        if notify:
            breaker.storage.start_window()


class _OpenState(_CurrentStateOnly, CircuitOpenState):
    def before_call(self, func: Any, *args: Any, **kwargs: Any) -> None:
        if not self._breaker.open_period_over():
            raise BreakerOpenError("circuit breaker is open", self._breaker.opens_at)


class _HalfOpenState(_CurrentStateOnly, CircuitHalfOpenState):
    def __init__(self, breaker: CircuitBreaker, prev_state: Any = None, notify: bool = False):
        self._admitted = 0
        self._successes = 0
        super().__init__(breaker, prev_state, notify)  # pyright: ignore[reportUnknownMemberType]

    @property
    def has_room(self) -> bool:
        return self._admitted < self._breaker.half_open_max

    def before_call(self, func: Any, *args: Any, **kwargs: Any) -> None:
        if not self.has_room:
            raise BreakerOpenError(
                "circuit breaker is half-open and its trial calls are taken", None
            )
        self._admitted += 1

    def release(self) -> None:
        """Give back the slot of a trial call that ended without an outcome (cancelled)."""
        self._admitted -= 1

    def on_success(self) -> None:
        self._successes += 1
        if self._successes >= self._breaker.half_open_max:
            self._breaker.close()


class _StateClass(Protocol):
    """How aiobreaker constructs a state (as `_create_new_state` calls it)."""

    def __call__(
        self, breaker: CircuitBreaker, prev_state: Any = None, notify: bool = False
    ) -> CircuitBreakerBaseState: ...


_STATE_CLASSES: dict[CircuitBreakerState, _StateClass] = {
    CircuitBreakerState.CLOSED: _ClosedState,
    CircuitBreakerState.OPEN: _OpenState,
    CircuitBreakerState.HALF_OPEN: _HalfOpenState,
}


@dataclass(frozen=True)
class BreakerSnapshot:
    """A breaker as it reads at one moment (what the next call would meet)."""

    state: str
    consecutive_failures: int
    seconds_until_half_open: float


class StateChangeLog(CircuitBreakerListener):
    """Logs every state change of a breaker."""

    def state_change(self, breaker: Any, old: Any, new: Any) -> None:
        before = STATE_NAMES[old.state] if old is not None else None
        after = STATE_NAMES[new.state]
        level = logging.WARNING if after == "open" else logging.INFO
        logger.log(
            level,
            f"circuit breaker {breaker.name} {after}",
            extra={"breaker": breaker.name, "from_state": before, "to_state": after},
        )


class CircuitBreaker(aiobreaker.CircuitBreaker):
    """aiobreaker's breaker with a failure window, a bounded half-open and a clock.

    Trips after `failure_threshold` consecutive failures (counts cleared every
    `interval_s` while closed); stays open `open_s` seconds, refusing calls with
    `BreakerOpenError`; then admits at most `half_open_max` trial calls, of which as
    many successes close it and any failure opens it again. A failure is any exception
    of the guarded call not matched by `exclude`.
    """

    def __init__(
        self,
        *,
        failure_threshold: int = 5,
        interval_s: float = 10.0,
        open_s: float = 30.0,
        half_open_max: int = 3,
        clock: Clock = time.monotonic,
        name: str = "breaker",
        listeners: Iterable[CircuitBreakerListener] = (),
        exclude: Iterable[type[Exception] | Callable[[Exception], bool]] = (),
    ) -> None:
        if failure_threshold < 1 or half_open_max < 1:
            raise ValueError("failure_threshold and half_open_max must be at least 1")
        self._clock = clock
        self.half_open_max = half_open_max
        self.storage = ClockedStorage(clock, interval_s)
        super().__init__(  # pyright: ignore[reportUnknownMemberType]
            fail_max=failure_threshold,
            timeout_duration=timedelta(seconds=open_s),
            exclude=list(exclude),
            listeners=[StateChangeLog(), *listeners],
            state_storage=self.storage,
            name=name,
        )

    def _create_new_state(
        self, new_state: CircuitBreakerState, prev_state: Any = None, notify: bool = False
    ) -> CircuitBreakerBaseState:
        return _STATE_CLASSES[new_state](self, prev_state=prev_state, notify=notify)

    def open(self) -> None:
        """Open the circuit now, by the injected clock."""
        self.storage.set_open()
        self.state = CircuitBreakerState.OPEN

    def close(self) -> None:
        """Close the circuit: no failures counted, a new counting window."""
        self.storage.set_closed()
        self.state = CircuitBreakerState.CLOSED

    def _open_remaining(self, record: StoredState, now: float) -> float:
        if record.state is not CircuitBreakerState.OPEN or record.opened_at is None:
            return 0.0
        # aiobreaker's setter annotates a datetime; it holds the timedelta given above.
        open_for = cast(timedelta, self.timeout_duration)
        return max(0.0, record.opened_at + open_for.total_seconds() - now)

    def seconds_until_half_open(self) -> float:
        """How long the open period still lasts (0 when not open or over)."""
        return self._open_remaining(self.storage.record, self._clock())

    def open_period_over(self) -> bool:
        return self.seconds_until_half_open() <= 0.0

    @property
    def opens_at(self) -> datetime | None:
        """Wall-clock estimate of when an open breaker lets trial calls through."""
        remaining = self.seconds_until_half_open()
        return datetime.now() + timedelta(seconds=remaining) if remaining > 0 else None

    @property
    def time_until_open(self) -> timedelta | None:
        remaining = self.seconds_until_half_open()
        return timedelta(seconds=remaining) if remaining > 0 else None

    def snapshot(self) -> BreakerSnapshot:
        """What the breaker reads as now, computed without changing anything.

        An open breaker whose period is over reads as half-open and a failure count whose
        window ended reads as zero, as the next call would find them; only that call
        makes the change. Safe from any thread: it reads one immutable record.
        """
        record = self.storage.record
        now = self._clock()
        remaining = self._open_remaining(record, now)
        state = record.state
        if state is CircuitBreakerState.OPEN and remaining <= 0.0:
            state = CircuitBreakerState.HALF_OPEN
        return BreakerSnapshot(
            state=STATE_NAMES[state],
            consecutive_failures=record.failures_at(now),
            seconds_until_half_open=remaining,
        )

    @property
    def state_name(self) -> str:
        """The state the next call meets: "closed", "open" or "half_open" (no side effect)."""
        return self.snapshot().state

    @property
    def consecutive_failures(self) -> int:
        """Failures in a row counted in the current window (no side effect)."""
        return self.snapshot().consecutive_failures

    def _advance(self) -> None:
        # Like gobreaker, asking whether a call may run moves an open breaker whose
        # period is over to half-open. Only on the event loop: it changes state.
        if self.storage.state is CircuitBreakerState.OPEN and self.open_period_over():
            self.half_open()

    def admits(self) -> bool:
        """Whether a call made now would run (rather than be refused).

        Call it on the event loop only: an open breaker whose period is over becomes
        half-open here, as it would on the call itself.
        """
        self._advance()
        state = self._state
        if isinstance(state, _HalfOpenState):
            return state.has_room
        return not isinstance(state, _OpenState)

    async def run(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run `operation` through the breaker.

        Raises `BreakerOpenError` without running it when the breaker refuses; otherwise
        returns its result or raises its own exception (also when that one tripped the
        breaker: aiobreaker would raise `CircuitBreakerError` in its place).
        """
        admitted_by: CircuitBreakerBaseState | None = None

        async def guarded() -> T:
            nonlocal admitted_by
            # No await lies between admission and here, so this is the admitting state.
            admitted_by = self._state
            return await operation()

        try:
            # aiobreaker leaves call_async's result unannotated: it is `guarded`'s.
            result = await self.call_async(guarded)  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
            return cast(T, result)
        except BreakerOpenError:
            raise
        except CircuitBreakerError as exc:
            if exc.__cause__ is None:
                raise
            raise exc.__cause__ from None
        except asyncio.CancelledError:
            # Neither success nor failure reached aiobreaker: free the trial slot.
            # `guarded` set `admitted_by`, which the checker's narrowing (to None) misses.
            if isinstance(admitted_by, _HalfOpenState) and admitted_by is self._state:  # pyright: ignore[reportUnnecessaryIsInstance]
                admitted_by.release()
            raise
