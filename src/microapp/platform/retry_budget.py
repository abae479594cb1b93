"""A retry budget: a token bucket that bounds how many retries a service may send."""

from __future__ import annotations

import time
from collections.abc import Callable


class RetryBudget:
    """`capacity` tokens, refilled at `refill_per_s` per second; one token per retry.

    Starts full. While a downstream fails, retries can add at most `capacity` plus
    `refill_per_s` per second to its load, however many callers there are.
    """

    def __init__(
        self,
        capacity: int = 20,
        refill_per_s: float = 10.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity < 0 or refill_per_s < 0:
            raise ValueError("capacity and refill_per_s must not be negative")
        self.capacity = capacity
        self.refill_per_s = refill_per_s
        self._clock = clock
        self._tokens = float(capacity)
        self._refilled_at = clock()

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(0.0, now - self._refilled_at)
        self._tokens = min(float(self.capacity), self._tokens + elapsed * self.refill_per_s)
        self._refilled_at = now

    def try_acquire(self) -> bool:
        """Take one token if there is a whole one; never waits."""
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    @property
    def tokens(self) -> int:
        """Whole tokens available now."""
        self._refill()
        return int(self._tokens)
