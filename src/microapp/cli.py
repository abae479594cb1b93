"""`microapp serve|up|migrate`: parse the command line, then call into the registry."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import sys
from collections.abc import Mapping, Sequence

from microapp import load
from microapp.platform.config import ConfigError
from microapp.platform.db import migrate
from microapp.platform.migrations import load_migrations
from microapp.platform.server import ServerOptions, bind_listener, run, run_workers
from microapp.services import SERVICES, ServiceSpec
from microapp.serving import (
    SERVER_CHOICES,
    SERVER_VARIABLE,
    SERVICE_VARIABLE,
    missing_server_message,
    prepare_service,
    server_from_env,
)

logger = logging.getLogger("microapp.cli")


def _parser(services: Mapping[str, ServiceSpec]) -> argparse.ArgumentParser:
    names = ", ".join(services)
    parser = argparse.ArgumentParser(
        prog="microapp",
        description="Cooperating Connect-protocol microservices on one ASGI stack.",
        epilog="Every service reads its settings from the environment; see docs/configuration.md.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run one service (HTTP/1.1 and h2c on one port)",
        description=f"Run one service with Hypercorn. Services: {names}.",
    )
    serve.add_argument("service", choices=list(services), metavar="SERVICE", help=names)
    serve.add_argument("--host", help="address to listen on (default: $HOST or 0.0.0.0)")
    serve.add_argument(
        "--port", type=int, help="port to listen on (default: $PORT or the service's)"
    )
    _add_server_argument(serve)
    serve.add_argument(
        "--workers",
        type=load.positive(int),
        default=1,
        help="processes sharing the port (default 1); Hypercorn only. Each has its own "
        "pools, queues and breakers: see docs/configuration.md",
    )
    # Internal: a worker of `--workers N` serves the socket its parent bound.
    serve.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)

    mig = commands.add_parser(
        "migrate",
        help="apply a service's SQL migrations and exit",
        description="Apply the service's versioned SQL migrations to $DATABASE_URL.",
    )
    mig.add_argument(
        "service",
        choices=[n for n, s in services.items() if s.migrations_package],
        metavar="SERVICE",
        help=names,
    )
    mig.add_argument("--database-url", help="PostgreSQL URL (default: $DATABASE_URL)")

    up = commands.add_parser(
        "up",
        help="run the whole system on this machine",
        description=(
            "Start every service on its default port on 127.0.0.1, with an embedded "
            "PostgreSQL under .microapp/ (or --database-url, or --no-db). Ctrl-C stops all."
        ),
    )
    db = up.add_mutually_exclusive_group()
    db.add_argument("--database-url", help="use this PostgreSQL server instead of the embedded one")
    db.add_argument("--no-db", action="store_true", help="run every service without a database")
    up.add_argument("--data-dir", default=".microapp", help="where the embedded database lives")
    up.add_argument(
        "--load",
        type=load.positive(float),
        metavar="RATE",
        help="once every service is healthy, also run `microapp load --rate RATE` until Ctrl-C",
    )
    _add_server_argument(up)

    load.add_arguments(
        commands.add_parser(
            "load",
            help="put steady traffic on a running system (greet, invoke, login)",
            description=load.__doc__,
            epilog=load.EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    return parser


def _add_server_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        choices=SERVER_CHOICES,
        default=server_from_env(os.environ),
        help="ASGI server (default: $MICROAPP_SERVER or hypercorn). hypercorn: every protocol, "
        "pure Python; pyvoy: every protocol on Envoy, fastest (extra microapp[pyvoy]); "
        "granian: fast, Connect and gRPC-Web only, no gRPC (extra microapp[granian]). "
        "See docs/configuration.md",
    )


def _server_problem(server: str) -> str | None:
    """Why `server` cannot run (an unknown $MICROAPP_SERVER, a missing extra), or None."""
    if server not in SERVER_CHOICES:
        return f"{SERVER_VARIABLE}={server!r} is not one of {', '.join(SERVER_CHOICES)}"
    return missing_server_message(server)


def _serve(args: argparse.Namespace, services: Mapping[str, ServiceSpec]) -> int:
    name = args.service
    problem = _server_problem(args.server)
    if problem:
        print(f"microapp serve {name}: {problem}", file=sys.stderr)
        return 2
    if args.workers > 1 and args.server != "hypercorn":
        print(
            f"microapp serve {name}: --workers {args.workers} needs --server hypercorn; "
            f"{args.server} serves from one process (run more replicas instead)",
            file=sys.stderr,
        )
        return 2
    env = dict(os.environ)
    if args.host:
        env["HOST"] = args.host
    if args.port is not None:
        env["PORT"] = str(args.port)
    try:
        # Every setting (LOG_LEVEL included) is checked before logging is set up with it.
        services[name].read_settings(env)
        built = prepare_service(name, env, services)
    except ConfigError as exc:
        print(f"microapp serve {name}: {exc}", file=sys.stderr)
        return 2
    if args.server == "pyvoy":
        return _serve_with_pyvoy(name, env, built.settings.host, built.settings.port)
    try:
        if args.workers > 1:
            return _serve_with_workers(args, built.settings.host, built.settings.port)
        options = ServerOptions(
            host=built.settings.host,
            port=built.settings.port,
            server=args.server,
            listen_fd=args.listen_fd,
        )
        run(built.app, options)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            print(
                f"microapp serve {name}: port {built.settings.port} is already in use",
                file=sys.stderr,
            )
            return 1
        raise
    return 0


def _serve_with_workers(args: argparse.Namespace, host: str, port: int) -> int:
    """Bind the port here, then run `args.workers` Hypercorn processes serving it."""
    listener = bind_listener(host, port)

    def worker(fd: int) -> list[str]:
        return [
            sys.executable, "-m", "microapp", "serve", args.service,
            "--host", host, "--port", str(port), "--server", "hypercorn", "--listen-fd", str(fd),
        ]  # fmt: skip

    return run_workers(worker, listener, args.workers)


def _serve_with_pyvoy(name: str, env: dict[str, str], host: str, port: int) -> int:
    """Envoy builds and serves the app itself; the one built here only checked the settings."""
    from microapp.platform.pyvoy_server import PyvoyOptions, run_pyvoy

    options = PyvoyOptions(
        host=host,
        port=port,
        app_ref="microapp.pyvoy_app:app",
        env={**env, SERVICE_VARIABLE: name},
    )
    try:
        return run_pyvoy(options)
    except Exception as exc:  # pyvoy's StartupError: Envoy said why on stderr
        print(f"microapp serve {name}: Envoy failed to start ({exc})", file=sys.stderr)
        return 1


def _migrate(args: argparse.Namespace, services: Mapping[str, ServiceSpec]) -> int:
    spec = services[args.service]
    url = args.database_url or os.environ.get("DATABASE_URL", "").strip()
    if not url:
        print("microapp migrate: set DATABASE_URL or pass --database-url", file=sys.stderr)
        return 2
    assert spec.migrations_package is not None
    try:
        applied = asyncio.run(migrate(url, load_migrations(spec.migrations_package)))
    except Exception as exc:
        print(f"microapp migrate {spec.name}: {exc}", file=sys.stderr)
        return 1
    if applied:
        print(f"{spec.name}: applied migrations {', '.join(map(str, applied))}")
    else:
        print(f"{spec.name}: database is up to date")
    return 0


def main(argv: Sequence[str] | None = None, services: Mapping[str, ServiceSpec] = SERVICES) -> int:
    """Entry point of the `microapp` command; `services` is the registry it serves from."""
    args = _parser(services).parse_args(argv)
    if args.command == "serve":
        return _serve(args, services)
    if args.command == "migrate":
        return _migrate(args, services)
    if args.command == "load":
        from microapp.load import run_load

        return run_load(args)
    return _up(args)


def _up(args: argparse.Namespace) -> int:
    problem = _server_problem(args.server)
    if problem:
        print(f"microapp up: {problem}", file=sys.stderr)
        return 2
    from microapp.up import run_up  # the embedded database is only needed here

    return run_up(args)


if __name__ == "__main__":
    sys.exit(main())
