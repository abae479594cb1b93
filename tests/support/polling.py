"""Await a condition instead of sleeping a guessed time."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(
    probe: Callable[[], T | Awaitable[T]], *, timeout: float = 10.0, interval: float = 0.05
) -> T:
    """Call `probe` until it returns something truthy, and return that.

    Raises `TimeoutError` with the last value seen when the condition never holds.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if loop.time() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s; last value: {value!r}")
        await asyncio.sleep(interval)
