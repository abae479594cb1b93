"""The HTTP/2 transport our Connect clients share for service-to-service calls."""

from __future__ import annotations

from urllib.parse import urlsplit

from pyqwest import Client, HTTPTransport, HTTPVersion


class ServiceTransport:
    """One pyqwest transport per downstream base URL, opened lazily, closed at shutdown.

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

    async def start(self) -> None:
        """Nothing to open: connections are made on first use."""

    async def close(self) -> None:
        """Close the pooled connections."""
        await self._transport.aclose()
