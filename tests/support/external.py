"""A real HTTP server standing in for "the outside world", controlled by the test.

One aiohttp test server (`aiohttp.test_utils.TestServer`) on a loopback port it binds itself,
in the test's event loop. Every request is recorded. What it answers:

- `/respond?status=418&size=5000&delay=0.5`: that status with a body of `size` bytes (streamed
  in chunks, with a Content-Length) after `delay` seconds;
- `/stream?size=N`: N bytes chunked, without a Content-Length;
- `/redirect?to=URL`: 302 to URL; `/loop`: 302 to itself;
- `/set-cookie`: 200 with a `session` cookie;
- a path given to `serve_json`: that JSON document, built afresh for each request;
- a path given to `hold`: nothing until the server closes (a target slower than any timeout);
- anything else: 200 `ok`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote

from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict, CIMultiDictProxy

_CHUNK = b"x" * 65536


@dataclass(frozen=True)
class Received:
    """One request as the server saw it."""

    method: str
    path: str
    query: dict[str, str]
    headers: CIMultiDictProxy[str]


class ExternalServer:
    """The outside world on `host` (a loopback address); use as `async with ExternalServer():`."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.received: list[Received] = []
        self._documents: dict[str, Callable[[], object]] = {}
        self._held: set[str] = set()
        self._release = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._server = TestServer(app, host=host)

    @property
    def requests(self) -> int:
        """How many requests arrived so far."""
        return len(self.received)

    @property
    def port(self) -> int:
        assert self._server.port, "the server is not started"
        return self._server.port

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def url(self, *, status: int = 200, size: int = 0, delay: float = 0.0) -> str:
        """The URL that answers `status` with `size` bytes after `delay` seconds."""
        return f"{self.base_url}/respond?status={status}&size={size}&delay={delay}"

    def url_for(self, path: str) -> str:
        """The URL of `path` (with any query) on this server."""
        return self.base_url + path

    def redirect_to(self, url: str) -> str:
        """A URL on this server that redirects (302) to `url`."""
        return self.url_for("/redirect?to=" + quote(url, safe=""))

    def serve_json(self, path: str, document: Callable[[], object]) -> None:
        """Answer GETs of `path` with `document()` as JSON."""
        self._documents[path] = document

    def hold(self, path: str) -> None:
        """Never answer `path` while the server runs."""
        self._held.add(path)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.received.append(
            Received(
                request.method,
                request.path,
                dict(request.query),
                CIMultiDictProxy(CIMultiDict(request.headers)),
            )
        )
        if request.path in self._documents:
            return web.json_response(self._documents[request.path]())
        if request.path in self._held:
            await self._release.wait()
            return web.Response(status=503, text="closing")
        if request.path == "/respond":
            return await _respond(request)
        if request.path == "/stream":
            return await _stream(request, int(request.query["size"]), chunked=True)
        if request.path == "/redirect":
            raise web.HTTPFound(request.query["to"])
        if request.path == "/loop":
            raise web.HTTPFound("/loop")
        if request.path == "/set-cookie":
            response = web.Response(text="cookie set")
            response.set_cookie("session", "secret-of-the-first-caller")
            return response
        return web.Response(text="ok")

    async def start(self) -> None:
        await self._server.start_server(access_log=None)

    async def close(self) -> None:
        self._release.set()  # held requests end, so closing does not wait for them
        await self._server.close()

    async def __aenter__(self) -> ExternalServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def _respond(request: web.Request) -> web.StreamResponse:
    status = int(request.query.get("status", "200"))
    delay = float(request.query.get("delay", "0"))
    if delay:
        await asyncio.sleep(delay)  # the slow target itself, not a test waiting on a guess
    return await _stream(request, int(request.query.get("size", "0")), status=status)


async def _stream(
    request: web.Request, size: int, *, status: int = 200, chunked: bool = False
) -> web.StreamResponse:
    response = web.StreamResponse(status=status)
    if chunked:
        response.enable_chunked_encoding()
    else:
        response.content_length = size
    await response.prepare(request)
    remaining = size
    while remaining > 0:
        await response.write(_CHUNK[: min(remaining, len(_CHUNK))])
        remaining -= min(remaining, len(_CHUNK))
    await response.write_eof()
    return response
