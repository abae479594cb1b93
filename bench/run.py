"""The benchmark harness: `python -m bench.run` (or `make bench`).

Starts every server it measures on a free loopback port, drives it with h2load for a
bounded time, stops it, and prints requests per second, p50/p99 latency and failed
requests (non-2xx answers, resets, errors; the target is zero everywhere):

  (a) unary   custom-lang's Invoke (no database) through `microapp serve custom-lang`
              on every server option, over Connect and over gRPC, beside the same proto
              on grpcio's asyncio server (the peer) and the ratio to it;
  (b) chain   greeter -> caller -> a local external server, PostgreSQL on, with each
              server: the peak, and the p99 overhead of the greeter -> caller hop at 50%
              of that peak;
  (c) gateway InvokeCustom through gateway -> custom-lang, PostgreSQL on, each server;
  rest_db     `python -m bench.rest_db` (REST with its INSERT against Express), included;
  profile     py-spy on Hypercorn serving (a) over Connect and over gRPC.

Targets are reported, not asserted. Results also go to a JSON file (--out).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path

import aiohttp
from aiohttp import web

from bench.load import (
    CONNECT_PROTO_HEADERS,
    GRPC_HEADERS,
    LoadResult,
    LoadShape,
    grpc_frame,
    h2load_path,
    run_h2load,
)
from bench.profile import summarize_profile

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
GREET_PATH = "/greeter.v1.GreeterService/Greet"
INVOKE_PATH = "/customlang.v1.CustomLangService/Invoke"
CALL_EXTERNAL_PATH = "/caller.v1.CallerService/CallExternal"
INVOKE_CUSTOM_PATH = "/gateway.v1.GatewayService/InvokeCustom"
# Issue 14: < 10 ms with the fastest option; issue 18 (databases on): < 5 ms with the best.
HOP_OVERHEAD_TARGETS_MS = (10.0, 5.0)
SERVERS = ("hypercorn", "granian", "pyvoy")
EXTERNAL_BODY_BYTES = 1256


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Every h2load run of this process: (what was measured, its failed requests).
RUNS: list[tuple[str, int]] = []


async def measure(url: str, body: bytes, headers: tuple[str, ...], shape: LoadShape) -> LoadResult:
    """One h2load run, its failed requests (errors and non-2xx answers) kept in RUNS."""
    result = await run_h2load(url, body, headers, shape)
    protocol = "grpc" if GRPC_HEADERS[0] in headers else "connect"
    RUNS.append((f"{url} ({protocol})", result.failed + result.non_2xx))
    return result


# ---------------------------------------------------------------------------- processes


class Server:
    """A server process of the benchmark, logging to a file, stopped with SIGTERM."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None):
        self.name = name
        self.argv = list(argv)
        self.env = {**os.environ, **(env or {})}
        self.log = Path(tempfile.mkstemp(prefix=f"microapp-bench-{name}-", suffix=".log")[1])
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, port: int, *, timeout_s: float = 30.0) -> None:
        with self.log.open("wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv, env=self.env, cwd=ROOT, stdout=log, stderr=log,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.returncode is not None:
                raise RuntimeError(f"{self.name} exited early:\n{self.log.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not listen on {port}")
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        # The whole session: multi-worker servers leave children otherwise.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(15):
                await self.process.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            await self.process.wait()


@contextlib.asynccontextmanager
async def serving(
    name: str, argv: Sequence[str], port: int, env: Mapping[str, str] | None = None
) -> AsyncIterator[Server]:
    server = Server(name, argv, env)
    try:
        await server.start(port)
        yield server
    finally:
        await server.stop()


async def wait_http(url: str, status: int = 200, *, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url) as resp:
                    if resp.status == status:
                        return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} never answered {status}")
            await asyncio.sleep(0.1)


def microapp_serve(
    service: str, port: int, server: str = "hypercorn", *, workers: int = 1
) -> list[str]:
    return [
        PYTHON, "-m", "microapp", "serve", service, "--host", "127.0.0.1", "--port", str(port),
        "--server", server, "--workers", str(workers),
    ]  # fmt: skip


# ---------------------------------------------------------------------------- (a) unary


@dataclass(frozen=True)
class Variant:
    """One way of serving custom-lang's Invoke for scenario (a)."""

    label: str
    server: str  # hypercorn | granian | pyvoy | grpcio
    workers: int = 1
    protocols: tuple[str, ...] = ("connect", "grpc")
    # Protocols the server does not offer: reported as such, not measured.
    not_offered: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    note: str = ""

    def argv(self, port: int) -> list[str]:
        if self.server == "grpcio":
            return [PYTHON, "-m", "bench.serve", "--port", str(port)]
        return microapp_serve("custom-lang", port, self.server, workers=self.workers)


HYPERCORN = "hypercorn (microapp serve, the default)"
GRPCIO_PEER = Variant("grpcio asyncio server (peer)", "grpcio", protocols=("grpc",))
VARIANTS = [
    Variant(HYPERCORN, "hypercorn"),
    Variant(
        "hypercorn, LOG_LEVEL=INFO (an access line per call)",
        "hypercorn",
        protocols=("connect",),
        env=(("LOG_LEVEL", "INFO"),),
        note="every other row runs at LOG_LEVEL=WARNING, where no access line is written",
    ),
    Variant("hypercorn --workers 2", "hypercorn", workers=2),
    Variant(
        "granian (--server granian)",
        "granian",
        protocols=("connect",),
        not_offered=("grpc",),
        note="no ASGI trailers: gRPC is answered unimplemented",
    ),
    Variant("pyvoy (--server pyvoy)", "pyvoy"),
]


@dataclass
class UnaryRow:
    label: str
    protocol: str
    result: LoadResult | None  # None: the server does not offer the protocol
    note: str = ""


def invoke_bodies() -> dict[str, tuple[bytes, tuple[str, ...]]]:
    from microapp.gen.customlang.v1.customlang_pb2 import InvokeRequest

    message = InvokeRequest(name="bench").SerializeToString()
    return {
        "connect": (message, CONNECT_PROTO_HEADERS),
        "grpc": (grpc_frame(message), GRPC_HEADERS),
    }


async def smoke(url: str, body: bytes, headers: tuple[str, ...]) -> None:
    """A handful of requests that must all succeed before a variant is measured."""
    result = await run_h2load(url, body, headers, LoadShape(connections=1, streams=1, requests=20))
    if result.failed or result.non_2xx or result.succeeded == 0:
        raise RuntimeError(f"{url} does not answer: {result}")


def _server_env(variant: Variant) -> dict[str, str]:
    return {**SERVICE_ENV, **dict(variant.env)}


async def bench_unary(shape: LoadShape, variants: Sequence[Variant], rounds: int) -> list[UnaryRow]:
    """Every variant in turn, `rounds` times over; each keeps its best round, so that a
    neighbour's burst of load on this shared machine does not decide the comparison."""
    bodies = invoke_bodies()
    best: dict[tuple[str, str], UnaryRow] = {}
    for variant in variants:
        for protocol in variant.not_offered:
            best[(variant.label, protocol)] = UnaryRow(variant.label, protocol, None, variant.note)
    for round_number in range(1, rounds + 1):
        print(f"  round {round_number} of {rounds}", flush=True)
        for variant in [*variants, GRPCIO_PEER]:
            port = free_port()
            url = f"http://127.0.0.1:{port}{INVOKE_PATH}"
            env = _server_env(variant)
            async with serving(variant.label, variant.argv(port), port, env):
                for protocol in variant.protocols:
                    body, headers = bodies[protocol]
                    await smoke(url, body, headers)
                    result = await measure(url, body, headers, shape)
                    print(f"  {variant.label:52} {protocol:8} {result.row()}", flush=True)
                    key = (variant.label, protocol)
                    kept = best.get(key)
                    if (
                        kept is None
                        or kept.result is None
                        or result.requests_per_s > kept.result.requests_per_s
                    ):
                        best[key] = UnaryRow(variant.label, protocol, result, variant.note)
    return list(best.values())


async def profile_unary(shape: LoadShape, out_dir: Path) -> dict[str, object]:
    """py-spy on Hypercorn (`microapp serve custom-lang`) while h2load drives it, once
    over Connect and once over gRPC."""
    summaries: dict[str, object] = {}
    for protocol, (body, headers) in invoke_bodies().items():
        summaries[protocol] = await _profile_one(shape, out_dir, protocol, body, headers)
    return summaries


async def _profile_one(
    shape: LoadShape, out_dir: Path, protocol: str, body: bytes, headers: tuple[str, ...]
) -> dict[str, object]:
    port = free_port()
    url = f"http://127.0.0.1:{port}{INVOKE_PATH}"
    raw = out_dir / f"unary-profile-{protocol}.txt"
    raw.unlink(missing_ok=True)
    py_spy = Path(PYTHON).parent / "py-spy"
    argv = microapp_serve("custom-lang", port, "hypercorn")
    async with serving("profiled hypercorn", argv, port, SERVICE_ENV) as server:
        assert server.process is not None
        await smoke(url, body, headers)
        spy = await asyncio.create_subprocess_exec(
            str(py_spy), "record", "--pid", str(server.process.pid), "--rate", "250",
            "--duration", str(int(shape.duration_s)), "--format", "raw",
            "--output", str(raw), "--nonblocking",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        await asyncio.sleep(0.5)  # let py-spy attach before the load starts
        result = await measure(url, body, headers, replace(shape, warmup_s=0.5))
        print(f"  {'hypercorn under py-spy':52} {protocol:8} {result.row()}", flush=True)
        async with asyncio.timeout(shape.duration_s + 30):
            await spy.wait()
    if not raw.exists():
        return {"error": "py-spy wrote no profile (is ptrace allowed here?)"}
    summary = summarize_profile(raw.read_text())
    summary["load_under_profiler"] = asdict(result)
    summary["raw_file"] = str(raw)
    return summary


# ---------------------------------------------------------------------------- (b), (c)


class ExternalTarget:
    """The "outside world" for the chain: answers 200 with a fixed body, in this process."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/resource"
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> ExternalTarget:
        body = b"x" * EXTERNAL_BODY_BYTES

        async def resource(request: web.Request) -> web.Response:
            return web.Response(body=body)

        app = web.Application()
        app.router.add_get("/resource", resource)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@contextlib.asynccontextmanager
async def embedded_postgres(databases: Sequence[str]) -> AsyncIterator[object]:
    from microapp.devdb import EmbeddedPostgres

    with tempfile.TemporaryDirectory(prefix="microapp-bench-pg-") as tmp:
        pg = EmbeddedPostgres(Path(tmp) / "data", delete_on_close=True)
        await asyncio.to_thread(pg.start)
        try:
            await asyncio.to_thread(pg.create_databases, databases)
            yield pg
        finally:
            await asyncio.to_thread(pg.close)


# Telemetry off: the figures are of the stack, not of an exporter.
SERVICE_ENV = {"LOG_LEVEL": "WARNING", "OTEL_EXPORTER_OTLP_ENDPOINT": ""}


@dataclass
class ChainResult:
    peak: LoadResult
    half_rate_per_s: float
    chain_at_half: LoadResult
    caller_at_half: LoadResult
    hop_p99_overhead_ms: float
    hop_p50_overhead_ms: float
    chain_without_insert_at_half: LoadResult
    hop_only_p99_overhead_ms: float
    chain_at_tenth: LoadResult
    caller_at_tenth: LoadResult
    server: str = "hypercorn"


def at_rate(shape: LoadShape, total_per_s: float) -> LoadShape:
    return replace(shape, rate_per_connection=max(1.0, total_per_s / shape.connections))


async def bench_chain(shape: LoadShape, server: str) -> ChainResult:
    """The greeter -> caller hop, both services served by `server`."""
    from microapp.gen.caller.v1.caller_pb2 import CallExternalRequest
    from microapp.gen.greeter.v1.greeter_pb2 import GreetRequest

    async with embedded_postgres(["greeter_db", "caller_db"]) as pg, ExternalTarget() as ext:
        caller_port, greeter_port = free_port(), free_port()
        caller_env = {
            **SERVICE_ENV,
            "DATABASE_URL": pg.url("caller_db"),  # type: ignore[attr-defined]
            "CALLER_ALLOW_PRIVATE_NETWORKS": "1",  # the external target is on loopback
        }
        greeter_env = {
            **SERVICE_ENV,
            "DATABASE_URL": pg.url("greeter_db"),  # type: ignore[attr-defined]
            "CALLER_BASE_URL": f"http://127.0.0.1:{caller_port}",
            "EXTERNAL_API_URL": ext.url,
        }
        async with (
            serving(
                "caller", microapp_serve("caller", caller_port, server), caller_port, caller_env
            ),
            serving(
                "greeter",
                microapp_serve("greeter", greeter_port, server),
                greeter_port,
                greeter_env,
            ),
        ):
            await wait_http(f"http://127.0.0.1:{caller_port}/healthz")
            await wait_http(f"http://127.0.0.1:{greeter_port}/healthz")
            greet_url = f"http://127.0.0.1:{greeter_port}{GREET_PATH}"
            call_url = f"http://127.0.0.1:{caller_port}{CALL_EXTERNAL_PATH}"
            greet = GreetRequest(name="bench").SerializeToString()
            call = CallExternalRequest(url=ext.url).SerializeToString()
            await smoke(greet_url, greet, CONNECT_PROTO_HEADERS)
            await smoke(call_url, call, CONNECT_PROTO_HEADERS)

            peak = await measure(greet_url, greet, CONNECT_PROTO_HEADERS, shape)
            label = f"greeter chain ({server}), peak"
            print(f"  {label:52} {'connect':8} {peak.row()}", flush=True)
            half = peak.requests_per_s / 2
            paced = at_rate(shape, half)
            chain = await measure(greet_url, greet, CONNECT_PROTO_HEADERS, paced)
            label = f"greeter chain at {half:.0f}/s (50%)"
            print(f"  {label:52} {'connect':8} {chain.row()}", flush=True)
            direct = await measure(call_url, call, CONNECT_PROTO_HEADERS, paced)
            label = f"caller alone at {half:.0f}/s"
            print(f"  {label:52} {'connect':8} {direct.row()}", flush=True)
            # The same hop without the greeter's synchronous INSERT, to tell them apart.
            bare_port = free_port()
            bare_env = {k: v for k, v in greeter_env.items() if k != "DATABASE_URL"}
            bare_argv = microapp_serve("greeter", bare_port, server)
            async with serving("greeter (no database)", bare_argv, bare_port, bare_env):
                bare_url = f"http://127.0.0.1:{bare_port}{GREET_PATH}"
                await smoke(bare_url, greet, CONNECT_PROTO_HEADERS)
                bare = await measure(bare_url, greet, CONNECT_PROTO_HEADERS, paced)
            label = f"greeter without its INSERT at {half:.0f}/s"
            print(f"  {label:52} {'connect':8} {bare.row()}", flush=True)
            # And at light load, for the cost of the hop itself.
            tenth = at_rate(shape, peak.requests_per_s / 10)
            light = await measure(greet_url, greet, CONNECT_PROTO_HEADERS, tenth)
            label = f"greeter chain at {peak.requests_per_s / 10:.0f}/s (10%)"
            print(f"  {label:52} {'connect':8} {light.row()}", flush=True)
            light_direct = await measure(call_url, call, CONNECT_PROTO_HEADERS, tenth)
            label = f"caller alone at {peak.requests_per_s / 10:.0f}/s"
            print(f"  {label:52} {'connect':8} {light_direct.row()}", flush=True)
    return ChainResult(
        server=server,
        chain_at_tenth=light,
        caller_at_tenth=light_direct,
        chain_without_insert_at_half=bare,
        hop_only_p99_overhead_ms=bare.p99_ms - direct.p99_ms,
        peak=peak,
        half_rate_per_s=half,
        chain_at_half=chain,
        caller_at_half=direct,
        hop_p99_overhead_ms=chain.p99_ms - direct.p99_ms,
        hop_p50_overhead_ms=chain.p50_ms - direct.p50_ms,
    )


@dataclass
class GatewayResult:
    peak: LoadResult
    at_half: LoadResult
    custom_lang_alone: LoadResult
    server: str = "hypercorn"


async def bench_gateway(shape: LoadShape, server: str) -> GatewayResult | None:
    from microapp.services import SERVICES

    if "gateway" not in SERVICES or "custom-lang" not in SERVICES:
        print("  gateway or custom-lang is not in the registry yet: skipped", flush=True)
        return None
    from microapp.gen.customlang.v1.customlang_pb2 import InvokeRequest
    from microapp.gen.gateway.v1.gateway_pb2 import InvokeCustomRequest

    async with embedded_postgres(["gateway_db", "lang_db"]) as pg:
        lang_port, gateway_port = free_port(), free_port()
        lang_env = {**SERVICE_ENV, "DATABASE_URL": pg.url("lang_db")}  # type: ignore[attr-defined]
        gateway_env = {
            **SERVICE_ENV,
            "DATABASE_URL": pg.url("gateway_db"),  # type: ignore[attr-defined]
            "CUSTOM_LANG_BASE_URL": f"http://127.0.0.1:{lang_port}",
        }
        async with (
            serving(
                "custom-lang",
                microapp_serve("custom-lang", lang_port, server),
                lang_port,
                lang_env,
            ),
            serving(
                "gateway",
                microapp_serve("gateway", gateway_port, server),
                gateway_port,
                gateway_env,
            ),
        ):
            await wait_http(f"http://127.0.0.1:{lang_port}/healthz")
            await wait_http(f"http://127.0.0.1:{gateway_port}/healthz")
            url = f"http://127.0.0.1:{gateway_port}{INVOKE_CUSTOM_PATH}"
            lang_url = f"http://127.0.0.1:{lang_port}/customlang.v1.CustomLangService/Invoke"
            body = InvokeCustomRequest(name="bench").SerializeToString()
            lang_body = InvokeRequest(name="bench").SerializeToString()
            await smoke(url, body, CONNECT_PROTO_HEADERS)
            peak = await measure(url, body, CONNECT_PROTO_HEADERS, shape)
            label = f"gateway -> custom-lang ({server}), peak"
            print(f"  {label:52} {'connect':8} {peak.row()}", flush=True)
            half = peak.requests_per_s / 2
            paced = at_rate(shape, half)
            at_half = await measure(url, body, CONNECT_PROTO_HEADERS, paced)
            label = f"gateway -> custom-lang at {half:.0f}/s (50%)"
            print(f"  {label:52} {'connect':8} {at_half.row()}", flush=True)
            alone = await measure(lang_url, lang_body, CONNECT_PROTO_HEADERS, paced)
            label = f"custom-lang alone at {half:.0f}/s"
            print(f"  {label:52} {'connect':8} {alone.row()}", flush=True)
    return GatewayResult(peak=peak, at_half=at_half, custom_lang_alone=alone, server=server)


# ---------------------------------------------------------------------------- report


PACKAGES_REPORTED = (
    "hypercorn", "h2", "uvloop", "connectrpc", "protobuf", "starlette", "granian", "grpcio",
)  # fmt: skip


def machine() -> dict[str, object]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {d: version(d) for d in PACKAGES_REPORTED},
        "h2load": h2load_path(),
    }


@dataclass
class Report:
    machine: dict[str, object]
    shape: LoadShape
    unary: list[UnaryRow] = field(default_factory=list)
    chain: list[ChainResult] = field(default_factory=list)
    gateway: list[GatewayResult] = field(default_factory=list)
    rest_db: object = None
    profile: dict[str, object] | None = None
    # Every h2load run of the report: (what, failed requests).
    failures: list[tuple[str, int]] = field(default_factory=list)


# Issue 14's targets for (a): (label, protocol) -> least ratio to the grpcio peer.
UNARY_TARGETS = {
    ("pyvoy (--server pyvoy)", "connect"): 1.5,
    ("pyvoy (--server pyvoy)", "grpc"): 1.0,
    (HYPERCORN, "connect"): 0.45,
    (HYPERCORN, "grpc"): 0.4,
}


def _unary_summary(rows: Sequence[UnaryRow]) -> None:
    peer = next((r for r in rows if r.label == GRPCIO_PEER.label and r.result), None)
    if peer is None or peer.result is None or peer.result.requests_per_s <= 0:
        return
    base = peer.result.requests_per_s
    print(f"(a) grpcio peer: {base:.0f} req/s. microapp / grpcio (Connect | gRPC):")
    by_label: dict[str, dict[str, UnaryRow]] = {v.label: {} for v in VARIANTS}
    for row in rows:
        if row.label != GRPCIO_PEER.label:
            by_label.setdefault(row.label, {})[row.protocol] = row
    by_label = {label: protocols for label, protocols in by_label.items() if protocols}

    def cell(row: UnaryRow | None) -> str:
        if row is None:
            return "      -"
        if row.result is None:
            return "not offered"
        return f"{row.result.requests_per_s / base:5.2f} x"

    for label, protocols in by_label.items():
        print(
            f"    {cell(protocols.get('connect')):>11} | {cell(protocols.get('grpc')):>11}  {label}"
        )
    for (label, protocol), target in UNARY_TARGETS.items():
        row = by_label.get(label, {}).get(protocol)
        if row is None or row.result is None:
            continue
        ratio = row.result.requests_per_s / base
        verdict = "met" if ratio >= target else "NOT met"
        print(f"    target {label} [{protocol}] >= {target:g} x: {ratio:.2f} x, {verdict}")


def print_summary(report: Report) -> None:
    print("\n== summary")
    _unary_summary(report.unary)
    for c in report.chain:
        light = c.chain_at_tenth.p99_ms - c.caller_at_tenth.p99_ms
        print(
            f"(b) [{c.server}] chain peak {c.peak.requests_per_s:.0f} req/s; "
            f"at 50% ({c.half_rate_per_s:.0f}/s) "
            f"p99 {c.chain_at_half.p99_ms:.2f} ms vs caller alone {c.caller_at_half.p99_ms:.2f} ms"
            f" -> hop p99 overhead {c.hop_p99_overhead_ms:.2f} ms; without the greeter's "
            f"INSERT {c.hop_only_p99_overhead_ms:.2f} ms; at 10% {light:.2f} ms"
        )
    if report.chain:
        best = min(report.chain, key=lambda c: c.hop_p99_overhead_ms)
        for target in HOP_OVERHEAD_TARGETS_MS:
            verdict = "met" if best.hop_p99_overhead_ms < target else "NOT met"
            print(
                f"    target hop p99 overhead < {target:g} ms with the best option: {verdict} "
                f"({best.server}, {best.hop_p99_overhead_ms:.2f} ms)"
            )
    for g in report.gateway:
        print(
            f"(c) [{g.server}] gateway peak {g.peak.requests_per_s:.0f} req/s, "
            f"p50 {g.peak.p50_ms:.2f} ms, p99 {g.peak.p99_ms:.2f} ms; at 50% p99 "
            f"{g.at_half.p99_ms:.2f} ms (custom-lang alone {g.custom_lang_alone.p99_ms:.2f} ms)"
        )
    for protocol, summary in (report.profile or {}).items():
        if isinstance(summary, dict) and "by_package" in summary:
            print(f"profile of (a) on Hypercorn, {protocol}: share of CPU samples (self time):")
            for name, share in summary["by_package"].items():
                print(f"    {share * 100:5.1f} %  {name}")
    failed = [(what, n) for what, n in report.failures if n]
    total = sum(n for _, n in report.failures)
    verdict = "met" if total == 0 else "NOT met"
    print(f"failed requests in {len(report.failures)} h2load runs: {total} (target 0: {verdict})")
    for what, n in failed:
        print(f"    {n} failed: {what}")


async def main_async(args: argparse.Namespace) -> Report:
    shape = LoadShape(
        connections=args.connections,
        streams=args.streams,
        duration_s=args.duration,
        warmup_s=args.warmup,
    )
    report = Report(machine=machine(), shape=shape, failures=RUNS)
    print(f"machine: {json.dumps(report.machine)}")
    print(f"load: h2load -c {shape.connections} -m {shape.streams} -D {shape.duration_s:g} "
          f"--warm-up-time {shape.warmup_s:g} (h2c, prior knowledge)", flush=True)  # fmt: skip
    out_dir = Path(args.out).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    servers = [s for s in args.servers.split(",") if s]
    # The services' scenarios use half the streams: two Python services and PostgreSQL
    # share the machine, and their peak is reached well before.
    service_shape = replace(shape, streams=max(1, shape.streams // 2))
    if "unary" in args.scenarios:
        print("\n== (a) unary custom-lang Invoke, no database", flush=True)
        variants = [v for v in VARIANTS if v.server in servers]
        report.unary = await bench_unary(shape, variants, args.rounds)
    if "chain" in args.scenarios:
        print("\n== (b) greeter -> caller -> external, PostgreSQL on", flush=True)
        for server in servers:
            report.chain.append(await bench_chain(service_shape, server))
    if "gateway" in args.scenarios:
        print("\n== (c) gateway -> custom-lang, PostgreSQL on", flush=True)
        for server in servers:
            result = await bench_gateway(service_shape, server)
            if result is not None:
                report.gateway.append(result)
    if "rest_db" in args.scenarios:
        print("\n== REST with a database against Express (python -m bench.rest_db)", flush=True)
        report.rest_db = await run_rest_db(out_dir / "rest_db.json", servers)
    if "profile" in args.scenarios:
        print("\n== profile of (a) on Hypercorn with py-spy", flush=True)
        report.profile = await profile_unary(shape, out_dir)
    return report


async def run_rest_db(out: Path, servers: Sequence[str]) -> object:
    """`python -m bench.rest_db` (wrk, Express peer) as a child; its JSON figures."""
    process = await asyncio.create_subprocess_exec(
        PYTHON, "-m", "bench.rest_db", "--servers", ",".join(servers), "--out", str(out),
        cwd=ROOT,
    )  # fmt: skip
    if await process.wait() != 0:
        print(f"  bench.rest_db exited {process.returncode}: skipped", flush=True)
        return None
    return json.loads(await asyncio.to_thread(out.read_text))


SCENARIOS = ("unary", "chain", "gateway", "rest_db", "profile")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument(
        "scenarios",
        nargs="*",
        help=f"what to measure (default: all of {', '.join(SCENARIOS)})",
    )
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measurement")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    parser.add_argument("--rounds", type=int, default=2, help="(a): best of this many rounds")
    parser.add_argument("--connections", type=int, default=16, help="h2load -c")
    parser.add_argument("--streams", type=int, default=8, help="h2load -m (streams/connection)")
    parser.add_argument(
        "--servers",
        default=",".join(SERVERS),
        help=f"server options to measure, comma-separated (default: {','.join(SERVERS)})",
    )
    parser.add_argument(
        "--out", default=str(ROOT / ".microapp" / "bench" / "results.json"), help="JSON results"
    )
    args = parser.parse_args(argv)
    args.scenarios = args.scenarios or list(SCENARIOS)
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario {', '.join(sorted(unknown))}; choose from {SCENARIOS}")
    if args.duration <= 0 or args.duration > 120:
        parser.error("--duration must be in (0, 120] seconds")
    h2load_path()
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so every server started is stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    report = asyncio.run(main_async(args))
    print_summary(report)
    Path(args.out).write_text(json.dumps(asdict(report), indent=2, default=str))
    print(f"\nresults: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
