"""`microapp load` against a real `microapp up --no-db --load RATE` (every service, default
ports): a fixed-rate run reaches its rate and counts codes, Ctrl-C prints the summary so far,
up's own load run stops with up, and up's "Try it" lines work when pasted."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from collections.abc import AsyncIterator

import pytest

from tests.support.commands import BIN, run
from tests.support.ports import port_is_free
from tests.test_up import PORTS, UpProcess, microapp_up

RATE = 40.0


@pytest.fixture(scope="module")
async def system(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[UpProcess]:
    busy = [f"{name}:{port}" for name, port in PORTS.items() if not port_is_free(port)]
    assert not busy, f"these default ports are taken before the test: {busy}"
    async with microapp_up(tmp_path_factory.mktemp("up"), "--no-db", "--load", "5") as up:
        await up.read_until("Press Ctrl-C")
        yield up


def load_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "microapp", "load", *args]


def achieved_rate(summary: str) -> float:
    match = re.search(r"achieved ([\d.]+) req/s", summary)
    assert match, summary
    return float(match.group(1))


def row(summary: str, target: str) -> str:
    match = re.search(rf"^{target} .*$", summary, re.MULTILINE)
    assert match, summary
    return match.group(0)


async def test_a_fixed_rate_run_reaches_its_rate_and_counts_codes(system: UpProcess) -> None:
    result = await run(*load_command("--rate", f"{RATE:g}", "--duration", "3"), timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = result.stdout
    assert abs(achieved_rate(summary) - RATE) <= RATE * 0.10, summary
    assert "open loop, 40/s requested, connect" in summary
    assert "ok=" in row(summary, "greet")
    assert "ok=" in row(summary, "login")
    invoke = row(summary, "invoke")
    # custom-lang's error names (docs/custom-lang.md), answered through the gateway
    for code in ("ok", "resource_exhausted", "unavailable", "not_found"):
        assert f"{code}=" in invoke, summary
    assert "ok=" in row(summary, "total")
    # The progress line went to stderr, about once a second.
    assert re.search(r"rate +[\d.]+/s +p50 +[\d.]+ ms +p99", result.stderr), result.stderr


async def test_a_closed_loop_run_over_grpc_answers(system: UpProcess) -> None:
    args = ("--concurrency", "4", "--duration", "2", "--protocol", "grpc", "--targets", "greet")
    result = await run(*load_command(*args), timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "closed loop, 4 in flight, grpc" in result.stdout
    assert re.search(r"^greet +\d+ .* ok=\d+$", result.stdout, re.MULTILINE), result.stdout


async def test_ctrl_c_prints_the_summary_so_far_and_exits_0(system: UpProcess) -> None:
    process = await asyncio.create_subprocess_exec(
        *load_command("--rate", "20", "--duration", "0"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    async with asyncio.timeout(30):
        while b" p99 " not in await process.stderr.readline():  # the first progress line
            pass
    process.send_signal(signal.SIGINT)
    async with asyncio.timeout(30):
        out, _ = await process.communicate()
    assert process.returncode == 0
    summary = out.decode()
    assert "microapp load: interrupted after" in summary
    assert re.search(r"^total +[1-9]\d* ", summary, re.MULTILINE), summary


async def test_a_nothing_listening_target_is_named() -> None:
    closed = "http://127.0.0.1:9"  # the discard port: nothing listens there
    result = await run(*load_command("--targets", "greet", "--greeter", closed, "--duration", "1"))
    assert result.returncode == 1
    assert f"greet: {closed} is not reachable" in result.stderr
    assert "microapp up" in result.stderr


async def test_try_it_lines_work_when_pasted(system: UpProcess) -> None:
    lines = system.text().split("Try it:")[1].split("Press Ctrl-C")[0].strip().splitlines()
    buf_line = next(line.strip() for line in lines if " curl --http2-prior-knowledge" in line)
    assert buf_line.split()[0] == str(BIN / "buf"), buf_line  # the venv's, not a bare `buf`
    curl_line = next(line.strip() for line in lines if line.strip().startswith("curl"))
    for line in (buf_line, curl_line):
        result = await run("bash", "-c", line)
        assert result.returncode == 0, line + result.stderr
        assert "Hello Ada from greeter-service!" in result.stdout


async def test_up_load_runs_beside_the_services_and_stops_with_them(system: UpProcess) -> None:
    await system.read_until(" p99 ")  # up's load run shows its progress in up's output
    system.process.send_signal(signal.SIGINT)
    assert await system.finish() == 0, system.text()
    after = system.text().split("stopping")[-1]
    assert "microapp load: interrupted after" in system.text()
    assert "open loop, 5/s requested" in system.text()
    assert "services stopped" in after
