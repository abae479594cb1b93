"""A real HTTP server standing in for "the outside world", controlled by the test.

`GET /respond?status=418&size=5000&delay=0.5` answers that status with a body of `size`
bytes (streamed in chunks) after `delay` seconds. Every request is counted.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from tests.support.ports import free_port


class ExternalServer:
    """An aiohttp server on a free loopback port, in the test's event loop."""

    def __init__(self) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.requests = 0
        self._runner: web.AppRunner | None = None

    def url(self, *, status: int = 200, size: int = 0, delay: float = 0.0) -> str:
        return f"{self.base_url}/respond?status={status}&size={size}&delay={delay}"

    async def _respond(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        status = int(request.query.get("status", "200"))
        size = int(request.query.get("size", "0"))
        delay = float(request.query.get("delay", "0"))
        if delay:
            await asyncio.sleep(delay)
        response = web.StreamResponse(status=status)
        response.content_length = size
        await response.prepare(request)
        chunk = b"x" * 65536
        remaining = size
        while remaining > 0:
            await response.write(chunk[: min(remaining, len(chunk))])
            remaining -= min(remaining, len(chunk))
        await response.write_eof()
        return response

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/respond", self._respond)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
