"""HTTP GET of an external URL, with the body counted as it streams, never held whole.

Every hop (the URL and each redirect) passes the `TargetGuard` before anything is sent,
and the connector's resolver and socket factory apply it again to the addresses connected.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp
from yarl import URL

from microapp.platform.clients import HttpClient
from microapp.services.caller.guard import GuardedResolver, TargetGuard, guarded_socket_factory

_INT32_MAX = 2**31 - 1
_CHUNK = 64 * 1024
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Redirects followed before giving up, as browsers and aiohttp bound them too.
MAX_REDIRECTS = 5
# How long a resolved (and checked) address is reused for its name.
_DNS_CACHE_TTL_S = 60


@dataclass(frozen=True)
class FetchResult:
    """What the target answered: its status and how many body bytes it sent."""

    status_code: int
    body_length: int


@dataclass(frozen=True)
class FetchLimits:
    """Bounds on one fetch and on the connection pool shared by all of them."""

    timeout_s: float = 3.0
    max_body_bytes: int = 10 * 1024 * 1024
    max_connections: int = 100
    max_connections_per_host: int = 10
    max_redirects: int = MAX_REDIRECTS


class FetchTimeout(Exception):
    """The target did not answer in time."""


class FetchFailed(Exception):
    """The target could not be reached (DNS, refused connection, reset, bad response)."""


class BodyTooLarge(Exception):
    """The target's body passed the byte cap; reading stopped there."""


class RedirectRefused(Exception):
    """The target redirected too many times, or to something that is not a URL."""


class ExternalFetcher(HttpClient):
    """Fetches external URLs over one aiohttp session: `async with ExternalFetcher(...)`."""

    def __init__(self, guard: TargetGuard, limits: FetchLimits | None = None) -> None:
        self._guard = guard
        self._limits = limits or FetchLimits()

    def open_session(self) -> aiohttp.ClientSession:
        """A session whose connector applies the guard to every address it connects."""
        checked = self._guard.address_rule is not None
        connector = aiohttp.TCPConnector(
            limit=self._limits.max_connections,
            limit_per_host=self._limits.max_connections_per_host,
            ttl_dns_cache=_DNS_CACHE_TTL_S,
            resolver=GuardedResolver(aiohttp.DefaultResolver(), self._guard) if checked else None,
            socket_factory=guarded_socket_factory(self._guard) if checked else None,
        )
        # One session serves every caller: a cookie set for one must never reach the next.
        return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())

    async def fetch(self, url: str) -> FetchResult:
        """GET `url`; any HTTP status is a result, only failures to get one raise.

        Raises `TargetRefused`, `BodyTooLarge`, `RedirectRefused`, `FetchTimeout` or
        `FetchFailed`.
        """
        session = self.session
        try:
            # One deadline for the whole call, redirects included.
            async with asyncio.timeout(self._limits.timeout_s):
                return await self._follow(session, URL(url))
        except TimeoutError as exc:
            raise FetchTimeout(f"{url} did not answer within {self._limits.timeout_s} s") from exc
        except aiohttp.ClientError as exc:
            raise FetchFailed(f"{url}: {exc or type(exc).__name__}") from exc
        except UnicodeError as exc:
            # A redirect to a host name IDNA cannot encode: the resolver's lookup raises this.
            raise FetchFailed(f"{url}: a host name cannot be looked up ({exc})") from exc

    async def _follow(self, session: aiohttp.ClientSession, url: URL) -> FetchResult:
        """GET `url`, following redirects hop by hop so each hop is checked."""
        first = url
        for _ in range(self._limits.max_redirects + 1):
            self._guard.check_url(url)
            async with session.get(url, allow_redirects=False) as resp:
                location = resp.headers.get(aiohttp.hdrs.LOCATION)
                if resp.status not in _REDIRECT_STATUSES or not location:
                    return FetchResult(resp.status, await self._count_body(resp, url))
            url = _next_hop(url, location)
        raise RedirectRefused(
            f"{first} redirected more than {self._limits.max_redirects} times; stopped there"
        )

    async def _count_body(self, resp: aiohttp.ClientResponse, url: URL) -> int:
        cap = self._limits.max_body_bytes
        too_large = f"{url} sent a body larger than {cap} bytes (CALLER_MAX_BODY_BYTES)"
        if resp.content_length is not None and resp.content_length > cap:
            raise BodyTooLarge(too_large)
        length = 0
        async for chunk in resp.content.iter_chunked(_CHUNK):
            length += len(chunk)
            if length > cap:
                raise BodyTooLarge(too_large)
        return min(length, _INT32_MAX)


def _next_hop(url: URL, location: str) -> URL:
    try:
        hop = url.join(URL(location))
        _ = hop.raw_host  # IDNA errors surface here, not later in the guard
        return hop
    except ValueError:
        raise RedirectRefused(f"{url} redirected to {location!r}, which is not a URL") from None
