"""Hypercorn serving HTTP/1.1 and h2c (prior knowledge) on one port, stopping gracefully."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config
from hypercorn.typing import ASGIFramework

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerOptions:
    """How Hypercorn runs a service; the defaults suit long-lived service-to-service h2c."""

    host: str
    port: int
    # Hypercorn closes a connection after this many requests (default 1000); under h2c
    # load that showed as failed calls, so keep connections for as long as they live.
    keep_alive_max_requests: int = 1_000_000_000
    # In-flight requests get this long to finish after SIGTERM.
    graceful_timeout: float = 10.0
    h2_max_concurrent_streams: int = 1000
    use_uvloop: bool = True
    # "hypercorn" (the default) or the opt-in "granian" (see docs/benchmarks.md).
    server: str = "hypercorn"


def hypercorn_config(options: ServerOptions) -> Config:
    """The Hypercorn configuration for one service."""
    config = Config()
    host = f"[{options.host}]" if ":" in options.host else options.host
    config.bind = [f"{host}:{options.port}"]
    config.keep_alive_max_requests = options.keep_alive_max_requests
    config.graceful_timeout = options.graceful_timeout
    config.h2_max_concurrent_streams = options.h2_max_concurrent_streams
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


def ignore_body_frames_after_the_answer() -> None:
    """Keep an h2c connection alive when body frames arrive for a stream already answered.

    Hypercorn 0.18 looks such a stream up after closing it and the KeyError tears down
    the whole connection, failing every other request multiplexed on it (a proxy's, a
    service client's). A server may answer before reading the body (wrong content type,
    oversized body), so this is ordinary traffic. Upstream: pgjones/hypercorn#329.
    """
    import h2.events
    from hypercorn.protocol.h2 import H2Protocol

    handle_events = H2Protocol._handle_events
    if getattr(handle_events, "ignores_late_body_frames", False):
        return

    async def _handle_events(self: H2Protocol, events: list[h2.events.Event]) -> None:
        # One event at a time: answering one event can close the stream the next is for.
        for event in events:
            if isinstance(event, h2.events.DataReceived) and event.stream_id not in self.streams:
                self.connection.acknowledge_received_data(
                    event.flow_controlled_length, event.stream_id
                )
                await self._flush()
                continue
            await handle_events(self, [event])

    _handle_events.ignores_late_body_frames = True  # type: ignore[attr-defined]
    H2Protocol._handle_events = _handle_events  # type: ignore[method-assign]


async def serve_until_signalled(app: ASGIFramework, options: ServerOptions) -> None:
    """Serve until SIGTERM or SIGINT, then stop accepting, finish in-flight requests,
    run the app's shutdown (which drains queues and closes pools) and return."""
    ignore_body_frames_after_the_answer()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    logger.info("listening", extra={"address": f"http://{options.host}:{options.port}"})
    await hypercorn_serve(app, hypercorn_config(options), shutdown_trigger=stop.wait)
    logger.info("stopped")


async def serve_with_granian_until_signalled(app: ASGIFramework, options: ServerOptions) -> None:
    """The opt-in server: Granian's HTTP/1.1 and h2c (Rust), embedded in this event loop.

    About three times Hypercorn's unary throughput here, but Granian offers no ASGI
    trailers, so it serves Connect and gRPC-Web and not gRPC; and its embedded mode is
    marked experimental.
    """
    from granian.constants import HTTPModes, Interfaces
    from granian.http import HTTP2Settings
    from granian.server.embed import Server

    server = Server(
        app,
        address=options.host,
        port=options.port,
        interface=Interfaces.ASGI,
        http=HTTPModes.auto,
        websockets=False,
        backlog=1024,
        log_enabled=False,
        http2_settings=HTTP2Settings(max_concurrent_streams=options.h2_max_concurrent_streams),
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stop)
    logger.info(
        "listening", extra={"address": f"http://{options.host}:{options.port}", "server": "granian"}
    )
    await server.serve()
    logger.info("stopped")


def run(app: ASGIFramework, options: ServerOptions) -> None:
    """Run the event loop (uvloop when available) serving `app`."""
    serve = (
        serve_with_granian_until_signalled if options.server == "granian" else serve_until_signalled
    )
    if options.use_uvloop:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
            pass
        else:
            uvloop.run(serve(app, options))
            return
    asyncio.run(serve(app, options))
