"""argon2id password hashes, computed and checked off the event loop."""

from __future__ import annotations

import asyncio

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError


class Passwords:
    """Hashes and checks passwords with argon2id in a worker thread.

    A check against no stored hash still runs one argon2 verification (against a dummy
    hash), so a login for an unknown email costs what a wrong password costs.
    """

    def __init__(self, hasher: PasswordHasher | None = None) -> None:
        self._hasher = hasher or PasswordHasher(type=Type.ID)
        if self._hasher.type is not Type.ID:
            raise ValueError("passwords must be hashed with argon2id")
        self._dummy_hash: str | None = None

    async def start(self) -> None:
        """Make the dummy hash now, so the first unknown-email login costs no extra hash."""
        await self._dummy()

    async def close(self) -> None:
        """Nothing to release."""

    async def hash(self, password: str) -> str:
        """A new argon2id hash of `password`."""
        return await asyncio.to_thread(self._hasher.hash, password)

    async def check(self, stored_hash: str | None, password: str) -> bool:
        """True when `password` matches `stored_hash`; None always fails, after the same work."""
        if stored_hash is None:
            await asyncio.to_thread(self._verify, await self._dummy(), password)
            return False
        return await asyncio.to_thread(self._verify, stored_hash, password)

    def needs_rehash(self, stored_hash: str) -> bool:
        """True when the hash was made with other parameters than today's."""
        try:
            return self._hasher.check_needs_rehash(stored_hash)
        except InvalidHashError:
            return False

    def _verify(self, stored_hash: str, password: str) -> bool:
        try:
            return self._hasher.verify(stored_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    async def _dummy(self) -> str:
        if self._dummy_hash is None:
            self._dummy_hash = await self.hash("not a password anyone has: dummy for timing")
        return self._dummy_hash
