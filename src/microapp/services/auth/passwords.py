"""argon2id password hashes, computed and checked off the event loop in a bounded pool."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Callable
from typing import TypeVar

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

T = TypeVar("T")

DEFAULT_HASH_CONCURRENCY = 2
DEFAULT_HASH_QUEUE_TIMEOUT_S = 5.0


class PasswordsBusy(Exception):
    """Every hashing slot stayed taken for the whole queue timeout."""


class Passwords:
    """Hashes and checks passwords with argon2id, at most `concurrency` at a time.

    Each argon2id computation holds 64 MiB, so the number running at once is what bounds
    the service's memory: a dedicated pool of `concurrency` threads runs them, and a
    request that finds every slot taken waits at most `queue_timeout_s` before
    `PasswordsBusy`, so a burst of logins is refused instead of queued without end.

    A check against no stored hash still runs one argon2 verification (against a dummy
    hash), so a login for an unknown email costs what a wrong password costs.
    """

    def __init__(
        self,
        hasher: PasswordHasher | None = None,
        *,
        concurrency: int = DEFAULT_HASH_CONCURRENCY,
        queue_timeout_s: float = DEFAULT_HASH_QUEUE_TIMEOUT_S,
    ) -> None:
        self._hasher = hasher or PasswordHasher(type=Type.ID)
        if self._hasher.type is not Type.ID:
            raise ValueError("passwords must be hashed with argon2id")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._concurrency = concurrency
        self._queue_timeout_s = queue_timeout_s
        self._slots = asyncio.Semaphore(concurrency)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=concurrency, thread_name_prefix="argon2"
        )
        self._dummy_hash: str | None = None

    @property
    def concurrency(self) -> int:
        """How many hashes may be computed at the same time."""
        return self._concurrency

    async def start(self) -> None:
        """Make the dummy hash now, so the first unknown-email login costs no extra hash."""
        await self._dummy()

    async def close(self) -> None:
        """Stop the pool; hashes still queued are dropped, running ones finish."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def hash(self, password: str) -> str:
        """A new argon2id hash of `password`; `PasswordsBusy` when no slot frees in time."""
        return await self._run(self._hasher.hash, password)

    async def check(self, stored_hash: str | None, password: str) -> bool:
        """True when `password` matches `stored_hash`; None always fails, after the same work."""
        if stored_hash is None:
            await self._run(self._verify, await self._dummy(), password)
            return False
        return await self._run(self._verify, stored_hash, password)

    def needs_rehash(self, stored_hash: str) -> bool:
        """True when the hash was made with other parameters than today's."""
        try:
            return self._hasher.check_needs_rehash(stored_hash)
        except InvalidHashError:
            return False

    async def _run(self, work: Callable[..., T], *args: str) -> T:
        try:
            async with asyncio.timeout(self._queue_timeout_s):
                await self._slots.acquire()
        except TimeoutError:
            raise PasswordsBusy("too many password checks at once; try again shortly") from None
        loop = asyncio.get_running_loop()
        try:
            future = self._pool.submit(work, *args)
        except BaseException:
            self._slots.release()
            raise
        # The slot is given back when the thread is done, not when this request stops
        # waiting: a cancelled request must not let one more 64 MiB hash start.
        future.add_done_callback(lambda _: self._release_from_thread(loop))
        return await asyncio.wrap_future(future)

    def _release_from_thread(self, loop: asyncio.AbstractEventLoop) -> None:
        # A loop closed meanwhile (shutdown) has nobody left to hand the slot to.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._slots.release)

    def _verify(self, stored_hash: str, password: str) -> bool:
        try:
            return self._hasher.verify(stored_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    async def _dummy(self) -> str:
        if self._dummy_hash is None:
            self._dummy_hash = await self.hash("not a password anyone has: dummy for timing")
        return self._dummy_hash
