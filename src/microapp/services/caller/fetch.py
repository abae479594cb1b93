"""HTTP GET of an external URL, with the body counted as it streams, never held whole."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp

_INT32_MAX = 2**31 - 1
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class FetchResult:
    """What the target answered: its status and how many body bytes it sent."""

    status_code: int
    body_length: int


class FetchTimeout(Exception):
    """The target did not answer in time."""


class FetchFailed(Exception):
    """The target could not be reached (DNS, refused connection, reset, bad response)."""


class ExternalFetcher:
    """An aiohttp session opened at startup and closed at shutdown."""

    def __init__(self, *, timeout_s: float = 3.0, follow_redirects: bool = True) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._follow_redirects = follow_redirects
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Open the session (aiohttp needs a running loop for it)."""
        self._session = aiohttp.ClientSession(
            timeout=self._timeout,
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=60),
        )

    async def close(self) -> None:
        """Close the session and its connections."""
        if self._session is not None:
            await self._session.close()

    async def fetch(self, url: str) -> FetchResult:
        """GET `url`; any HTTP status is a result, only failures to get one raise."""
        if self._session is None:
            raise RuntimeError("ExternalFetcher.start() was not called")
        try:
            async with self._session.get(url, allow_redirects=self._follow_redirects) as resp:
                length = 0
                async for chunk in resp.content.iter_chunked(_CHUNK):
                    length += len(chunk)
                return FetchResult(resp.status, min(length, _INT32_MAX))
        except TimeoutError as exc:
            raise FetchTimeout(f"{url} did not answer within {self._timeout.total} s") from exc
        except aiohttp.ClientError as exc:
            raise FetchFailed(f"{url}: {exc or type(exc).__name__}") from exc
