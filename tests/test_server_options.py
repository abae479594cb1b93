"""The server options of `microapp serve` and `microapp up`: MICROAPP_SERVER, pyvoy's drain,
`--workers`.

The protocol matrix of every option (grpcio, connect-node, buf curl) is in test_clients.py;
this file covers choosing a server and stopping it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import sys
from pathlib import Path

import psutil
import pytest
from connectrpc.errors import ConnectError

from microapp.gen.caller.v1.caller_connect import CallerServiceClient
from microapp.gen.caller.v1.caller_pb2 import CallExternalRequest
from microapp.gen.customlang.v1.customlang_connect import CustomLangServiceClient
from microapp.gen.customlang.v1.customlang_pb2 import InvokeRequest
from microapp.serving import SERVER_CHOICES
from tests.support.external import ExternalServer
from tests.support.polling import eventually
from tests.support.postgres import TestPostgres, query
from tests.support.services import ServiceProcess

LOCAL_TARGETS = {"CALLER_ALLOW_PRIVATE_NETWORKS": "1"}


def _log_records(service: ServiceProcess) -> list[dict[str, object]]:
    records = []
    for line in service.logs().splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
    return records


def _listening_server(service: ServiceProcess) -> object:
    listening = [r for r in _log_records(service) if r.get("message") == "listening"]
    assert listening, service.logs()
    return listening[-1].get("server", "hypercorn")


@pytest.mark.parametrize("server", SERVER_CHOICES)
async def test_microapp_server_picks_the_server_of_microapp_serve(server: str) -> None:
    async with ServiceProcess("custom-lang", {"MICROAPP_SERVER": server}) as lang:
        await lang.wait_for("/healthz", 200)
        assert _listening_server(lang) == server


async def test_an_unknown_microapp_server_is_refused_with_the_choices() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "microapp", "serve", "custom-lang",
        env={**os.environ, "MICROAPP_SERVER": "tornado"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await process.communicate()
    assert process.returncode == 2
    assert "MICROAPP_SERVER='tornado' is not one of hypercorn, granian, pyvoy" in stderr.decode()


async def test_pyvoy_drains_on_sigterm_under_load_and_every_answered_call_is_stored(
    postgres: TestPostgres, external: ExternalServer
) -> None:
    db = postgres.fresh_database("srv_pyvoy")
    env = {"MICROAPP_SERVER": "pyvoy", "DATABASE_URL": db, **LOCAL_TARGETS}
    caller = ServiceProcess("caller", env)
    await caller.start()
    await caller.wait_for("/healthz", 200)
    sizes = itertools.count()
    answered: list[int] = []
    refused: list[BaseException] = []
    enough = asyncio.Event()

    async def keep_calling() -> None:
        # One client per worker: its connection sees the drain (GOAWAY) like a real peer's.
        async with CallerServiceClient(caller.url) as client:
            while True:
                size = next(sizes)
                try:
                    result = await client.call_external(
                        CallExternalRequest(url=external.url(size=size))
                    )
                except (ConnectError, OSError) as exc:
                    refused.append(exc)  # the listener is gone: this worker is done
                    return
                assert result.body_length == size
                answered.append(size)
                if len(answered) >= 200:
                    enough.set()

    workers = [asyncio.create_task(keep_calling()) for _ in range(8)]
    try:
        async with asyncio.timeout(60):
            await enough.wait()
        assert await caller.stop(signal.SIGTERM, timeout=30) == 0, caller.logs()[-3000:]
        async with asyncio.timeout(30):
            await asyncio.gather(*workers)
    finally:
        for worker in workers:
            worker.cancel()
        await caller.stop()
    stored = [r[0] for r in query(db, "SELECT body_length FROM call_logs")]
    assert len(stored) == len(set(stored)), "a row was written twice"
    missing = set(answered) - set(stored)
    assert not missing, f"{len(missing)} answered calls have no row"
    assert len(refused) == len(workers)  # every worker ended on the stopped server
    assert not [p for p in psutil.process_iter(["name"]) if _is_envoy_of(p, caller.port)]


def _is_envoy_of(process: psutil.Process, port: int) -> bool:
    try:
        cmdline = " ".join(process.cmdline())
    except psutil.Error:
        return False
    return "envoy" in cmdline and f'"port_value": {port}' in cmdline


async def test_microapp_up_runs_every_service_on_the_chosen_server(tmp_path: Path) -> None:
    from tests.test_up import PORTS, _greet, _invoke, microapp_up

    async with microapp_up(tmp_path, "--no-db", "--server", "pyvoy") as up:
        await up.read_until("Press Ctrl-C")
        await _greet(up, "Envoy")
        await _invoke(up, "Envoy")
        envoys = [p for p in psutil.process_iter(["name"]) if _is_envoy_of_any(p, PORTS)]
        assert len(envoys) == len(PORTS), up.text()
        up.process.send_signal(signal.SIGTERM)
        assert await up.finish() == 0, up.text()
    assert "(pyvoy)" in up.text()
    assert not [p for p in psutil.process_iter(["name"]) if _is_envoy_of_any(p, PORTS)]


def _is_envoy_of_any(process: psutil.Process, ports: dict[str, int]) -> bool:
    return any(_is_envoy_of(process, port) for port in ports.values())


async def _answering_pid(port: int, workers: set[int]) -> tuple[int, asyncio.StreamWriter]:
    """Open a connection, get one answer on it, and name the worker holding it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /livez HTTP/1.1\r\nHost: localhost\r\n\r\n")
    await writer.drain()
    status = await reader.readline()
    assert status.startswith(b"HTTP/1.1 200"), status
    local_port = writer.get_extra_info("sockname")[1]
    for pid in workers:
        connections = psutil.Process(pid).net_connections(kind="tcp")
        if any(c.raddr and c.raddr.port == local_port for c in connections):
            return pid, writer
    raise AssertionError(f"no worker of {workers} holds the connection from {local_port}")


async def test_workers_share_one_port_both_answer_and_sigterm_drains_both() -> None:
    service = ServiceProcess("custom-lang", {"LOG_LEVEL": "INFO"}, args=["--workers", "2"])
    writers: list[asyncio.StreamWriter] = []
    try:
        await service.start()
        await eventually(lambda: len(set(_listening_pids(service))) == 2, timeout=30)
        workers = set(_listening_pids(service))
        assert service.process is not None
        children = {c.pid for c in psutil.Process(service.process.pid).children()}
        assert children == workers
        # Each connection is accepted by one worker: open them until both have answered.
        answered: set[int] = set()
        for _ in range(200):
            pid, writer = await _answering_pid(service.port, workers)
            answered.add(pid)
            writers.append(writer)
            if answered == workers:
                break
        assert answered == workers, "only one worker ever answered"
        async with CustomLangServiceClient(service.url) as client:
            reply = await client.invoke(InvokeRequest(name="workers"))
        assert reply.message == "Hello workers from custom-lang-service!"
        assert await service.stop(signal.SIGTERM, timeout=30) == 0, service.logs()[-3000:]
    finally:
        for writer in writers:
            writer.close()
        if service.process is not None:
            await service.stop(signal.SIGKILL)
    stopped = [r for r in _log_records(service) if r.get("message") == "stopped"]
    assert len(stopped) == 2, service.logs()[-3000:]  # both drained and ran their shutdown
    assert not [p for p in workers if _is_running(p)]


def _listening_pids(service: ServiceProcess) -> list[int]:
    records = _log_records(service)
    return [int(str(r["pid"])) for r in records if r.get("message") == "listening" and "pid" in r]


def _is_running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("server", ["pyvoy", "granian"])
async def test_workers_with_a_single_process_server_are_refused_clearly(server: str) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "microapp", "serve", "custom-lang",
        "--server", server, "--workers", "2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await process.communicate()
    assert process.returncode == 2
    assert f"--workers 2 needs --server hypercorn; {server} serves from one process" in (
        stderr.decode()
    )


async def test_pyvoy_serves_with_a_pythonpath_set(tmp_path: Path) -> None:
    """A PYTHONPATH in the environment once replaced pyvoy's own paths for Envoy's Python,
    which then found no standard library; its entries still reach the app's imports."""
    extra = tmp_path / "extra"
    extra.mkdir()
    env = {"MICROAPP_SERVER": "pyvoy", "PYTHONPATH": str(extra)}
    async with ServiceProcess("custom-lang", env) as lang:
        await lang.wait_for("/healthz", 200)
        assert _listening_server(lang) == "pyvoy"
