"""The clients a service holds for its whole life: an aiohttp session, a pyqwest transport.

Both are async context managers, entered on the service's lifespan exit stack (build_app's
`ServiceParts.resources`): opened at startup, closed at shutdown.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self
from urllib.parse import urlsplit

import aiohttp
from pyqwest import Client, HTTPTransport, HTTPVersion


class HttpClient:
    """Base of the clients that own one aiohttp session: the fetcher, the JWKS client, ...

    aiohttp wants a running event loop for its session (and connector), so a subclass
    says how to make it in `open_session` and the session exists only between entering
    and leaving: `async with Client(...) as client:`.
    """

    _session: aiohttp.ClientSession | None = None

    def open_session(self) -> aiohttp.ClientSession:
        """A new session, with the subclass's timeouts, connector and cookie policy."""
        return aiohttp.ClientSession()

    @property
    def session(self) -> aiohttp.ClientSession:
        """The open session; a `RuntimeError` outside the `async with` block."""
        if self._session is None:
            raise RuntimeError(f"{type(self).__name__} is used outside its `async with` block")
        return self._session

    async def __aenter__(self) -> Self:
        self._session = self.open_session()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


class ServiceTransport:
    """One pyqwest transport per downstream base URL; connections are made on first use
    and closed when the block is left.

    Plain `http://` targets get HTTP/2 with prior knowledge (h2c), so many calls share
    one connection; `https://` targets negotiate with ALPN.
    """

    def __init__(self, base_url: str) -> None:
        scheme = urlsplit(base_url).scheme
        if scheme not in {"http", "https"}:
            raise ValueError(f"service URL must be http(s)://, got {base_url!r}")
        self._transport = HTTPTransport(
            http_version=HTTPVersion.HTTP2 if scheme == "http" else None,
            tls_include_system_certs=True,
            follow_redirects=False,
        )
        self.client = Client(self._transport)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._transport.aclose()
