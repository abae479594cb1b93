"""Serve one benchmark target in the foreground until SIGTERM: `python -m bench.serve ...`.

Every Hypercorn variant goes through the platform's own runner
(`microapp.platform.server`), with `ServerOptions` changed one field at a time; only
the multi-worker variant needs Hypercorn's process manager, fed the same config.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from microapp.platform.logging import configure_logging
from microapp.platform.server import ServerOptions, hypercorn_config, run

UNARY_APP_PATH = "bench.apps:unary_greeter_app"


def _hypercorn(args: argparse.Namespace) -> None:
    options = ServerOptions(
        host="127.0.0.1",
        port=args.port,
        keep_alive_max_requests=args.keep_alive_max_requests,
        h2_max_concurrent_streams=args.h2_max_concurrent_streams,
        use_uvloop=args.loop == "uvloop",
    )
    if args.workers == 1:
        from bench.apps import unary_greeter_app

        run(unary_greeter_app(), options)
        return
    from hypercorn.run import run as hypercorn_run

    config = hypercorn_config(options)
    config.application_path = UNARY_APP_PATH + "()"
    config.workers = args.workers
    config.worker_class = args.loop
    hypercorn_run(config)


def _granian(args: argparse.Namespace) -> None:
    if args.workers == 1:
        # What `microapp serve --server granian` runs: Granian embedded in our loop.
        from bench.apps import unary_greeter_app

        options = ServerOptions(
            host="127.0.0.1",
            port=args.port,
            h2_max_concurrent_streams=args.h2_max_concurrent_streams,
            use_uvloop=args.loop == "uvloop",
            server="granian",
        )
        run(unary_greeter_app(), options)
        return
    # Several workers: Granian's own CLI, which forks them and stops on SIGTERM.
    argv = [
        "granian", "--interface", "asgi", "--http", "2", "--factory",
        "--host", "127.0.0.1", "--port", str(args.port),
        "--workers", str(args.workers), "--loop", args.loop,
        "--http2-max-concurrent-streams", str(args.h2_max_concurrent_streams),
        "--no-ws", "--log-level", "warning",
        UNARY_APP_PATH,
    ]  # fmt: skip
    os.execvp(os.path.join(os.path.dirname(sys.executable), "granian"), argv)


def _grpcio(args: argparse.Namespace) -> None:
    import asyncio

    from bench.grpc_peer import serve

    if args.loop == "uvloop":
        import uvloop

        uvloop.install()
    asyncio.run(serve(args.port))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.serve")
    parser.add_argument("server", choices=["hypercorn", "granian", "grpcio"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="uvloop")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--keep-alive-max-requests", type=int, default=1_000_000_000)
    parser.add_argument("--h2-max-concurrent-streams", type=int, default=1000)
    args = parser.parse_args()
    configure_logging("bench-" + args.server, level="WARNING")
    signal.signal(signal.SIGINT, signal.default_int_handler)
    {"hypercorn": _hypercorn, "granian": _granian, "grpcio": _grpcio}[args.server](args)


if __name__ == "__main__":
    main()
