"""A clock the test moves by hand, for code that takes an injected `clock()`."""

from __future__ import annotations


class FakeClock:
    """Monotonic seconds that change only when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward by `seconds`."""
        self.now += seconds
