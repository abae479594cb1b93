"""The opt-in `--server pyvoy`: Envoy (shipped in the pyvoy wheel) serving one service.

pyvoy runs Envoy as a child process; Envoy loads a Python interpreter of its own that
imports the service's ASGI app by name (`app_ref`) and runs its lifespan, so the app is
built inside Envoy, never in this process. Envoy brings HTTP/1.1 and h2c on one port with
HTTP/2 trailers: Connect, gRPC and gRPC-Web all work, unlike Granian.

This process only supervises: on SIGTERM or SIGINT it asks Envoy (admin API) to drain
its listeners, so connections get GOAWAY / `Connection: close` and no new ones are taken,
waits until no request is active (at most the graceful timeout), then stops Envoy, which
runs the app's lifespan shutdown (queues drained, pools closed) before it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyvoy import PyvoyServer

logger = logging.getLogger(__name__)

# The HTTP connection manager's stat prefix in the configuration pyvoy generates.
_ACTIVE_REQUESTS_STAT = "http.ingress_http.downstream_rq_active"


@dataclass(frozen=True)
class PyvoyOptions:
    """How Envoy serves one service."""

    host: str
    port: int
    # `module:attr` of the ASGI app, imported inside Envoy's Python.
    app_ref: str
    # Extra environment for Envoy's Python (the service to build, its settings).
    env: Mapping[str, str]
    graceful_timeout: float = 10.0
    # Envoy's Python threads; more than one only helps a free-threaded Python.
    worker_threads: int = 1


async def serve_with_pyvoy_until_signalled(options: PyvoyOptions) -> int:
    """Run Envoy until SIGTERM or SIGINT, then drain and stop it; Envoy's exit status."""
    from pyvoy import PyvoyServer

    server = PyvoyServer(
        options.app_ref,
        address=options.host,
        port=options.port,
        lifespan=True,
        worker_threads=options.worker_threads,
        env=_envoy_env(options.env),
        # Envoy's own lines (warnings and errors) and the app's JSON log go to our stderr.
        stdout=None,
        stderr=None,
        log_level="warn",
        # On drain, tell every connection at once (GOAWAY, `Connection: close`) and
        # close the listeners after a second: in-flight requests then finish.
        additional_envoy_args=["--drain-strategy", "immediate", "--drain-time-s", "1"],
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    logger.info(
        "listening",
        extra={"address": f"http://{options.host}:{server.listener_port}", "server": "pyvoy"},
    )
    exited = asyncio.create_task(server.wait())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if not exited.done():
        logger.info("service stopping", extra={"server": "pyvoy"})
        await _drain(server, options.graceful_timeout)
        await server.stop()
    status = await exited
    logger.info("stopped", extra={"server": "pyvoy", "status": status})
    return 0 if status in (0, None) else 1


def _envoy_env(env: Mapping[str, str]) -> dict[str, str]:
    """The service's environment for Envoy's Python, less the interpreter's own paths.

    pyvoy points Envoy's Python at this interpreter (PYTHONHOME, and PYTHONPATH from its
    sys.path, which already holds any PYTHONPATH entries); ours would replace those and
    leave it without a standard library.
    """
    return {k: v for k, v in env.items() if k not in {"PYTHONPATH", "PYTHONHOME"}}


async def _drain(server: PyvoyServer, timeout: float) -> None:
    """Stop taking connections and wait (bounded) for active requests to finish."""
    admin = _admin_address(server)
    if admin is None:
        logger.warning("pyvoy admin address unknown; stopping without draining")
        return
    try:
        await asyncio.to_thread(_admin_post, admin, "/drain_listeners?graceful")
    except OSError as exc:
        logger.warning("could not drain Envoy's listeners", extra={"error": str(exc)})
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            active = await asyncio.to_thread(_active_requests, admin)
        except OSError:
            return
        if active == 0:
            return
        await asyncio.sleep(0.05)
    logger.warning("requests still active after the graceful timeout", extra={"timeout": timeout})


def _admin_address(server: PyvoyServer) -> str | None:
    # pyvoy keeps the admin address it read at start-up; it has no public accessor
    # (pinned to pyvoy 1.3.x in pyproject).
    address = getattr(server, "_admin_address", None)
    return address if isinstance(address, str) and address else None


def _admin_post(admin: str, path: str) -> None:
    request = urllib.request.Request(f"http://{admin}{path}", method="POST")
    with urllib.request.urlopen(request, timeout=2) as response:
        response.read()


def _active_requests(admin: str) -> int:
    url = f"http://{admin}/stats?format=json&filter=^{_ACTIVE_REQUESTS_STAT}$"
    with urllib.request.urlopen(url, timeout=2) as response:
        stats = json.loads(response.read()).get("stats", [])
    return sum(int(s.get("value", 0)) for s in stats if s.get("name") == _ACTIVE_REQUESTS_STAT)


def run_pyvoy(options: PyvoyOptions) -> int:
    """Supervise Envoy from a fresh event loop; the process exit status."""
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(serve_with_pyvoy_until_signalled(options))
    return 0
