"""`microapp up`: the whole system on this machine, one process per service, one command.

Starts (or finds) the database (each service applies its own migrations at startup),
starts every service of the registry on its default port on 127.0.0.1, waits for every
/healthz, prints where everything is, and on Ctrl-C or SIGTERM stops the services
gracefully (each drains) and then the database.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import os
import shlex
import signal
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import aiohttp
from aiohttp import web

from microapp.services import SERVICES, ServiceSpec
from microapp.serving import SERVER_VARIABLE

HOST = "127.0.0.1"
HEALTH_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0


class UpError(Exception):
    """Something the user must fix before `up` can run; the message says what."""


class Console:
    """Step-by-step output, coloured on a terminal, plain when piped."""

    def __init__(self, stream: TextIO = sys.stdout) -> None:
        self._stream = stream
        self._colour = stream.isatty() and not os.environ.get("NO_COLOR")

    def _paint(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self._colour else text

    def step(self, text: str) -> None:
        self._print(f"{self._paint('36', '•')} {text}")

    def ok(self, text: str) -> None:
        self._print(f"{self._paint('32', '✓')} {text}")

    def fail(self, text: str) -> None:
        self._print(f"{self._paint('31', '✗')} {text}")

    def plain(self, text: str = "") -> None:
        self._print(text)

    def bold(self, text: str) -> str:
        return self._paint("1", text)

    def _print(self, text: str) -> None:
        print(text, file=self._stream, flush=True)


@dataclass
class Running:
    """One service process started by `up`."""

    spec: ServiceSpec
    port: int
    process: asyncio.subprocess.Process
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As a server binds: connections of a stopped run lingering in TIME_WAIT
        # do not make the port busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def check_ports(specs: Mapping[str, ServiceSpec]) -> None:
    """Refuse to start when a service's port is taken, naming the port and service."""
    taken = [
        f"port {s.default_port} ({s.name})"
        for s in specs.values()
        if not _port_free(s.default_port)
    ]
    if taken:
        raise UpError(
            f"{', '.join(taken)} already in use on {HOST}; stop whatever listens there "
            "(`ss -ltnp` shows it) and run `microapp up` again"
        )


class PidFile:
    """`<data-dir>/up.pid`: one `microapp up` at a time per data directory."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            other = int(self.path.read_text().strip())
        except (OSError, ValueError):
            other = None
        if other and other != os.getpid() and _alive(other):
            raise UpError(
                f"microapp up is already running (pid {other}); stop it with Ctrl-C in its "
                f"terminal or `kill {other}`"
            )
        self.path.write_text(str(os.getpid()))

    def release(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wiring_env(
    ports: Mapping[str, int],
    external_url: str,
    services: Mapping[str, ServiceSpec] = SERVICES,
) -> dict[str, str]:
    """How the services find each other on this machine (each reads what it needs).

    Every call the registry declares is wired to its callee's port, except those only
    needed behind a proxy: here the browser reaches every service itself.
    """
    env = {
        call.variable: f"http://{HOST}:{ports[call.service]}{call.path}"
        for spec in services.values()
        if spec.name in ports
        for call in spec.calls
        if call.service in ports and not call.proxied
    }
    # greeter's target: the local external page (and anything a developer tries) is on
    # this machine, which caller refuses unless private networks are allowed.
    env["EXTERNAL_API_URL"] = external_url
    if "caller" in ports:
        env["CALLER_ALLOW_PRIVATE_NETWORKS"] = "1"
    browser_pages = [spec.name for spec in services.values() if any(c.browser for c in spec.calls)]
    # The console runs on its own origin and calls the services' ports directly.
    origins = [
        f"http://{host}:{ports[name]}"
        for name in browser_pages
        if name in ports
        for host in (HOST, "localhost")
    ]
    if origins:
        env["CORS_ALLOWED_ORIGINS"] = ",".join(origins)
    return {k: v for k, v in env.items() if v}


class ExternalTarget:
    """A small local HTTP page standing in for the outside world, so Greet works offline."""

    def __init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        async def page(request: web.Request) -> web.Response:
            return web.Response(text="microapp local external target\n")

        app = web.Application()
        app.router.add_get("/", page)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, HOST, 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://{HOST}:{port}/"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def _start_service(spec: ServiceSpec, env: Mapping[str, str], logs: Path) -> Running:
    log_path = logs / f"{spec.name}.log"
    log = log_path.open("w")
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "microapp", "serve", spec.name,
            "--host", HOST, "--port", str(spec.default_port),
            env=dict(env), stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
    finally:
        log.close()
    return Running(spec, spec.default_port, process, log_path)


async def _wait_healthy(service: Running, session: aiohttp.ClientSession) -> None:
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    while True:
        if service.process.returncode is not None:
            raise UpError(f"{service.spec.name} exited with code {service.process.returncode}")
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.get(service.url + "/healthz", timeout=aiohttp.ClientTimeout(2)) as r:
                if r.status == 200:
                    return
        if time.monotonic() > deadline:
            raise UpError(f"{service.spec.name} was not healthy after {HEALTH_TIMEOUT_S:.0f} s")
        await asyncio.sleep(0.1)


async def _stop(service: Running) -> int | None:
    if service.process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            service.process.terminate()
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await service.process.wait()
        except TimeoutError:
            service.process.kill()
            await service.process.wait()
    return service.process.returncode


class Up:
    """One run of `microapp up`."""

    def __init__(self, args: argparse.Namespace, console: Console) -> None:
        self.args = args
        self.console = console
        self.data_dir = Path(args.data_dir).resolve()
        self.running: list[Running] = []
        self.database = None
        self.load: asyncio.subprocess.Process | None = None

    def database_urls(self) -> dict[str, str]:
        """Service name → DATABASE_URL, starting the embedded database when needed."""
        specs = [s for s in SERVICES.values() if s.database]
        if self.args.no_db:
            self.console.step("no database (--no-db): services run without storage")
            return {}
        if self.args.database_url:
            from microapp.devdb import with_database

            self.console.step("using the PostgreSQL server from --database-url")
            url = self.args.database_url
            return {s.name: with_database(url, s.database) for s in specs if s.database}
        from microapp.devdb import EmbeddedPostgres

        self.console.step(f"starting embedded PostgreSQL (data in {self.data_dir / 'postgres'})")
        self.database = EmbeddedPostgres(self.data_dir / "postgres")
        self.database.start()
        created = self.database.create_databases(s.database for s in specs if s.database)
        self.console.ok("PostgreSQL ready" + (f"; created {', '.join(created)}" if created else ""))
        return {s.name: self.database.url(s.database) for s in specs if s.database}

    async def run(self, stop: asyncio.Event) -> int:
        check_ports(SERVICES)
        db_urls = await asyncio.to_thread(self.database_urls)
        external = ExternalTarget()
        await external.start()
        try:
            return await self._run_services(db_urls, external, stop)
        finally:
            await self._stop_all()
            await external.close()

    async def _run_services(
        self, db_urls: Mapping[str, str], external: ExternalTarget, stop: asyncio.Event
    ) -> int:
        logs = self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        ports = {name: spec.default_port for name, spec in SERVICES.items()}
        external_url = os.environ.get("EXTERNAL_API_URL", "").strip() or external.url
        wiring = wiring_env(ports, external_url)
        base_env = {
            k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "PORT", "HOST"}
        }
        for spec in SERVICES.values():
            env = {**base_env, **wiring, SERVER_VARIABLE: self.args.server}
            if spec.name in db_urls:
                env["DATABASE_URL"] = db_urls[spec.name]
            elif self.args.no_db:
                # Without storage, auth logs anyone in only in its explicit development mode.
                env["AUTH_DEV_MODE"] = "1"
            self.console.step(
                f"starting {spec.name} on port {spec.default_port} ({self.args.server})"
            )
            self.running.append(await _start_service(spec, env, logs))

        async with aiohttp.ClientSession() as session:
            for service in self.running:
                started = time.monotonic()
                try:
                    await _wait_healthy(service, session)
                except UpError as exc:
                    self.console.fail(str(exc))
                    self.console.plain(f"--- last lines of {service.log_path} ---")
                    self.console.plain(service.log_tail())
                    return 1
                # /healthz answers 200 only once the service's migrations are applied.
                migrated = ", migrations applied" if service.spec.name in db_urls else ""
                took = time.monotonic() - started
                self.console.ok(f"{service.spec.name} healthy ({took:.1f} s{migrated})")
        self._print_summary(external_url)
        if self.args.load:
            self.load = await _start_load(self.args.load)
        return await self._supervise(stop)

    async def _supervise(self, stop: asyncio.Event) -> int:
        waits = {asyncio.create_task(s.process.wait()): s for s in self.running}
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({stopper, *waits}, return_when=asyncio.FIRST_COMPLETED)
        for task in (stopper, *waits):
            task.cancel()
        if stopper in done:
            self.console.plain()
            self.console.step("stopping (each service finishes its requests and drains)")
            return 0
        died = waits[next(iter(done - {stopper}))]
        self.console.fail(f"{died.spec.name} stopped unexpectedly (code {died.process.returncode})")
        self.console.plain(died.log_tail())
        return 1

    async def _stop_all(self) -> None:
        if self.load is not None:
            await _stop_load(self.load)
        codes = await asyncio.gather(*(_stop(s) for s in reversed(self.running)))
        for service, code in zip(reversed(self.running), codes, strict=True):
            if code not in (0, None):
                self.console.fail(f"{service.spec.name} exited with code {code}")
        if self.running:
            self.console.ok("services stopped")
        if self.database is not None:
            await asyncio.to_thread(self.database.close)
            self.console.ok("PostgreSQL stopped")

    def _print_summary(self, external_url: str) -> None:
        c = self.console
        c.plain()
        c.plain(c.bold(f"{'service':<13} {'url':<24} state"))
        for service in self.running:
            c.plain(f"{service.spec.name:<13} {service.url:<24} healthy")
        c.plain()
        c.plain(f"external target for Greet: {external_url}")
        c.plain(f"logs: {self.data_dir / 'logs'}")
        c.plain()
        greeter = f"http://{HOST}:{SERVICES['greeter'].default_port}"
        c.plain("Try it:")
        c.plain(
            f'  {_tool("buf")} curl --http2-prior-knowledge -d \'{{"name": "Ada"}}\' '
            f"{greeter}/greeter.v1.GreeterService/Greet"
        )
        c.plain(
            f"  curl -H 'Content-Type: application/json' -d '{{\"name\": \"Ada\"}}' "
            f"{greeter}/greeter.v1.GreeterService/Greet"
        )
        c.plain(
            f"  {_tool('microapp')} load --rate 20    # steady traffic; Ctrl-C prints a summary"
        )
        c.plain()
        c.plain("Press Ctrl-C to stop everything.")


def _tool(name: str) -> str:
    """How to run a tool installed beside this Python (buf and microapp live in the venv's
    bin/, often not on PATH), as a shell word that works when pasted."""
    path = Path(sys.executable).parent / name
    return shlex.quote(str(path)) if path.exists() else name


async def _start_load(rate: float) -> asyncio.subprocess.Process:
    """`microapp load --rate RATE` until stopped, writing to this terminal."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "microapp", "load", "--rate", f"{rate:g}", "--duration", "0"
    )


async def _stop_load(load: asyncio.subprocess.Process) -> None:
    """SIGINT, as Ctrl-C would: the load run prints its summary and exits."""
    if load.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            load.send_signal(signal.SIGINT)
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await load.wait()
        except TimeoutError:
            load.kill()
            await load.wait()


def run_up(args: argparse.Namespace) -> int:
    """Entry point of `microapp up`; returns the exit code."""
    if not (args.no_db or args.database_url):
        from microapp.devdb import embedded_postgres_missing

        # Before anything starts: without the `local` extra there is no database to run.
        missing = embedded_postgres_missing()
        if missing:
            print(f"microapp up: {missing}", file=sys.stderr)
            return 2
    console = Console()
    pid_file = PidFile(Path(args.data_dir).resolve() / "up.pid")
    try:
        pid_file.acquire()
    except UpError as exc:
        console.fail(str(exc))
        return 1
    try:
        return asyncio.run(_main(args, console))
    except UpError as exc:
        console.fail(str(exc))
        return 1
    finally:
        pid_file.release()


async def _main(args: argparse.Namespace, console: Console) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return await Up(args, console).run(stop)
