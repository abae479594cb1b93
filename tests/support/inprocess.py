"""An ASGI app on Hypercorn in the test's own event loop, for tests of the app itself."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
from hypercorn.asyncio import serve as hypercorn_serve
from starlette.applications import Starlette

from microapp.platform.server import ServerOptions, hypercorn_config
from tests.support.polling import eventually
from tests.support.ports import free_port


@contextlib.asynccontextmanager
async def serving(app: Starlette) -> AsyncIterator[str]:
    """Serve `app` as the CLI serves it (Hypercorn, h2c) on a free port; yields its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    stop = asyncio.Event()
    task = asyncio.create_task(
        hypercorn_serve(
            app,  # type: ignore[arg-type]
            hypercorn_config(ServerOptions(host="127.0.0.1", port=port)),
            shutdown_trigger=stop.wait,
        )
    )

    async def answers() -> bool:
        try:
            async with aiohttp.ClientSession() as session, session.get(url + "/livez") as resp:
                return resp.status == 200
        except aiohttp.ClientError:
            return False

    try:
        await eventually(answers)
        yield url
    finally:
        stop.set()
        await task
