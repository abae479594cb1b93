"""A retry budget: a token bucket that bounds how many retries a service may send."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class _Bucket:
    """The bucket's whole state as one immutable value: tokens as of `refilled_at`."""

    tokens: float
    refilled_at: float


@dataclass(frozen=True)
class RetryBudgetSnapshot:
    """A retry budget as it reads at one moment."""

    tokens: float
    capacity: int

    @property
    def whole_tokens(self) -> int:
        """Retries that could be sent now."""
        return int(self.tokens)


class RetryBudget:
    """`capacity` tokens, refilled at `refill_per_s` per second; one token per retry.

    Starts full. While a downstream fails, retries can add at most `capacity` plus
    `refill_per_s` per second to its load, however many callers there are.

    Only `try_acquire` (on the event loop) changes the bucket, by replacing one frozen
    value; `snapshot` computes the refill it would see without storing it, so it is safe
    from any thread (OpenTelemetry's exporter reads it from its own).
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
        self._bucket = _Bucket(float(capacity), clock())

    def _tokens_at(self, bucket: _Bucket, now: float) -> float:
        elapsed = max(0.0, now - bucket.refilled_at)
        return min(float(self.capacity), bucket.tokens + elapsed * self.refill_per_s)

    def try_acquire(self) -> bool:
        """Take one token if there is a whole one; never waits."""
        now = self._clock()
        tokens = self._tokens_at(self._bucket, now)
        if tokens < 1.0:
            self._bucket = _Bucket(tokens, now)
            return False
        self._bucket = _Bucket(tokens - 1.0, now)
        return True

    def snapshot(self) -> RetryBudgetSnapshot:
        """The tokens as they read now, refill included, without changing the bucket."""
        return RetryBudgetSnapshot(self._tokens_at(self._bucket, self._clock()), self.capacity)

    @property
    def tokens(self) -> int:
        """Whole tokens available now (no side effect)."""
        return self.snapshot().whole_tokens
