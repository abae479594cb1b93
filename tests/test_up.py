"""`microapp up`: the whole system on its default ports, from an empty directory, one command."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil
import pytest

from microapp.gen.gateway.v1.gateway_connect import GatewayServiceClient
from microapp.gen.gateway.v1.gateway_pb2 import InvokeCustomRequest
from microapp.gen.greeter.v1.greeter_connect import GreeterServiceClient
from microapp.gen.greeter.v1.greeter_pb2 import GreetRequest
from microapp.services import SERVICES
from tests.support.ports import port_is_free
from tests.support.postgres import query

PORTS = {name: spec.default_port for name, spec in SERVICES.items()}
START_TIMEOUT_S = 120.0


@pytest.fixture(autouse=True)
def default_ports_free() -> None:
    busy = [f"{name}:{port}" for name, port in PORTS.items() if not port_is_free(port)]
    assert not busy, f"these default ports are taken before the test: {busy}"


@dataclass
class UpProcess:
    process: asyncio.subprocess.Process
    cwd: Path
    output: list[str] = field(default_factory=list)

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{PORTS[service]}"

    def text(self) -> str:
        return "".join(self.output)

    async def read_until(self, marker: str) -> None:
        assert self.process.stdout is not None
        async with asyncio.timeout(START_TIMEOUT_S):
            while marker not in self.text():
                line = await self.process.stdout.readline()
                if not line:
                    raise AssertionError(f"up ended before {marker!r}:\n{self.text()}")
                self.output.append(line.decode())

    async def finish(self) -> int:
        assert self.process.stdout is not None
        async with asyncio.timeout(60):
            rest = await self.process.stdout.read()
            self.output.append(rest.decode())
            return await self.process.wait()


@asynccontextmanager
async def microapp_up(cwd: Path, *args: str) -> AsyncIterator[UpProcess]:
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "EXTERNAL_API_URL"}}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "microapp", "up", *args,
        cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    up = UpProcess(process, cwd)
    try:
        yield up
    finally:
        if process.returncode is None:
            # A test that failed midway: up cannot stop its services once killed, so take
            # them (and their servers' children, such as Envoy) down too, or they would hold
            # the default ports for every test after this one.
            left = _descendants(process.pid)
            process.kill()
            await process.wait()
            for child in left:
                with contextlib.suppress(psutil.Error):
                    child.kill()


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _postgres_processes(data_dir: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = " ".join(proc.info.get("cmdline") or [])
        if proc.info.get("name") == "postgres" and str(data_dir) in cmdline:
            found.append(proc)
    return found


def _embedded_url(data_dir: Path, database: str) -> str:
    # postmaster.pid: line 4 is the port, line 5 the socket directory.
    lines = (data_dir / "postmaster.pid").read_text().splitlines()
    return f"postgresql://postgres@/{database}?host={lines[4]}&port={lines[3]}"


async def _json(method: str, url: str, **kwargs: object) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as session, session.request(method, url, **kwargs) as resp:
        return resp.status, await resp.json(content_type=None)


async def _greet(up: UpProcess, name: str) -> None:
    async with GreeterServiceClient(up.url("greeter")) as client:
        greeting = await client.greet(GreetRequest(name=name))
    assert greeting.message == f"Hello {name} from greeter-service!"
    assert greeting.external_status == 200  # the local external target, no internet needed


async def _invoke(up: UpProcess, name: str) -> None:
    async with GatewayServiceClient(up.url("gateway")) as client:
        answer = await client.invoke_custom(InvokeCustomRequest(name=name))
    assert answer.message == f"Hello {name} from custom-lang-service!"


async def _login_and_verify(up: UpProcess, email: str) -> None:
    credentials = {"email": email, "password": "correct horse battery"}
    status, body = await _json("POST", up.url("auth") + "/auth/login", json=credentials)
    assert status == 200, body
    bearer = {"Authorization": f"Bearer {body['token']}"}
    status, body = await _json("GET", up.url("auth") + "/verify", headers=bearer)
    assert status == 200 and body["ok"] is True


async def _all_healthy(up: UpProcess) -> None:
    async with aiohttp.ClientSession() as session:
        for service in PORTS:
            async with session.get(up.url(service) + "/healthz") as resp:
                assert resp.status == 200, service


async def test_up_runs_the_whole_system_on_an_embedded_database(tmp_path: Path) -> None:
    async with microapp_up(tmp_path) as up:
        await up.read_until("Press Ctrl-C")
        children = _descendants(up.process.pid)
        await _all_healthy(up)

        await _greet(up, "Ada")
        await _invoke(up, "Grace")
        credentials = {"email": "ada@example.com", "password": "correct horse battery"}
        status, body = await _json("POST", up.url("auth") + "/auth/register", json=credentials)
        assert status == 201, body
        await _login_and_verify(up, "ada@example.com")

        data_dir = tmp_path / ".microapp" / "postgres"
        greetings = query(_embedded_url(data_dir, "greeter_db"), "SELECT name FROM greetings")
        assert ("Ada",) in greetings
        invocations = query(_embedded_url(data_dir, "gateway_db"), "SELECT name FROM invocations")
        assert ("Grace",) in invocations
        users = query(_embedded_url(data_dir, "auth_db"), "SELECT email FROM users")
        assert ("ada@example.com",) in users

        up.process.send_signal(signal.SIGTERM)
        assert await up.finish() == 0, up.text()

    assert "PostgreSQL stopped" in up.text()
    assert not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not _postgres_processes(data_dir)
    assert all(port_is_free(port) for port in PORTS.values())


async def test_up_without_a_database_serves_every_call(tmp_path: Path) -> None:
    async with microapp_up(tmp_path, "--no-db") as up:
        await up.read_until("Press Ctrl-C")
        await _all_healthy(up)
        await _greet(up, "NoDb")
        await _invoke(up, "NoDb")
        await _login_and_verify(up, "anyone@example.com")  # --no-db sets AUTH_DEV_MODE=1
        up.process.send_signal(signal.SIGINT)
        assert await up.finish() == 0, up.text()
    assert all(port_is_free(port) for port in PORTS.values())


async def test_a_taken_port_is_named_and_nothing_is_left_running(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", PORTS["caller"]))
        squatter.listen()
        async with microapp_up(tmp_path) as up:
            code = await up.finish()
        assert code == 1
        assert f"port {PORTS['caller']} (caller)" in up.text()
        others = [port for name, port in PORTS.items() if name != "caller"]
        assert all(port_is_free(port) for port in others)
    assert not _postgres_processes(tmp_path / ".microapp" / "postgres")


async def test_a_second_up_says_one_is_running(tmp_path: Path) -> None:
    async with microapp_up(tmp_path, "--no-db") as first:
        await first.read_until("Press Ctrl-C")
        async with microapp_up(tmp_path, "--no-db") as second:
            assert await second.finish() == 1
        assert "already running" in second.text()
        first.process.send_signal(signal.SIGTERM)
        assert await first.finish() == 0
