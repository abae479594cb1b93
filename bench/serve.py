"""Serve the grpcio peer in the foreground until SIGTERM: `python -m bench.serve --port N`.

Every microapp server option is measured through `microapp serve` itself; only the
peer, which is not microapp, needs a runner of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

from bench.grpc_peer import serve


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.serve")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    # grpcio's own asyncio server, on the default loop, as its documentation runs it.
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
