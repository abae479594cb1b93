"""A resource that starts and stops, used as an async context manager on the lifespan's
exit stack (`async with resource:` starts it, leaving the block closes it)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Self


class StartedResource(ABC):
    """Has `start()` and `close()`; `async with` calls them, for the service's lifespan.

    The methods stay public because tests and `microapp up` also drive them directly.
    """

    @abstractmethod
    async def start(self) -> None:
        """Acquire what the resource holds (tasks, connections)."""

    @abstractmethod
    async def close(self) -> None:
        """Release it; safe to call once after `start()`."""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
