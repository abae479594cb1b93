"""REST with a database against Express: `python -m bench.rest_db`.

custom-lang's `POST /invoke` writes one `executions` row before it answers. This drives
it with wrk over HTTP/1.1 (as a browser or a plain HTTP client would) on each server
option, with coalesced commits on and off, beside a minimal Express 5 + node-postgres
peer (bench/express/) doing the same INSERT into the same PostgreSQL, and the same
service without a database. One embedded PostgreSQL serves every run; each run has a
database of its own.

Needs wrk (`apt-get install wrk`) and node with `npm install` done in bench/express.
Figures are reported, not asserted; --out writes them as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from bench.run import (
    PYTHON,
    ROOT,
    SERVICE_ENV,
    embedded_postgres,
    free_port,
    microapp_serve,
    serving,
    wait_http,
)

EXPRESS_DIR = ROOT / "bench" / "express"
WRK_SCRIPT = """wrk.method = "POST"
wrk.body = '{"name": "bench"}'
wrk.headers["Content-Type"] = "application/json"
"""
SERVER_OPTIONS = ("hypercorn", "granian", "pyvoy")


@dataclass(frozen=True)
class WrkResult:
    """One wrk run: throughput, latency percentiles, and non-2xx answers or socket errors."""

    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int


@dataclass(frozen=True)
class Row:
    """One measured target."""

    label: str
    result: WrkResult
    rows_stored: int | None


_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if match is None:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(match[1]) * _UNIT_MS[match[2]]


def parse_wrk(output: str) -> WrkResult:
    """Requests/sec, the 50% and 99% latencies and the error counts of wrk --latency."""
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    if rate is None or p50 is None or p99 is None:
        raise RuntimeError(f"wrk output not understood:\n{output}")
    errors = 0
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if non_2xx:
        errors += int(non_2xx[1])
    sockets = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if sockets:
        errors += sum(int(n) for n in sockets.groups())
    return WrkResult(float(rate[1]), _ms(p50[1]), _ms(p99[1]), errors)


async def run_wrk(url: str, *, threads: int, connections: int, duration_s: int) -> WrkResult:
    """A warm-up second, then one measured wrk run."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT)
    base = ["wrk", f"-t{threads}", f"-c{connections}", "-s", script.name, "--latency"]
    try:
        await asyncio.to_thread(
            subprocess.run, [*base, "-d1s", url], capture_output=True, check=True
        )
        done = await asyncio.to_thread(
            subprocess.run,
            [*base, f"-d{duration_s}s", url],
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        await asyncio.to_thread(Path(script.name).unlink)
    return parse_wrk(done.stdout)


def _count_rows(url: str) -> int:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM executions").fetchone()
        return int(row[0]) if row else 0


def _node_env(database_url: str) -> dict[str, str]:
    """The PG* variables node-postgres reads, for the same server and database."""
    parts = urlsplit(database_url)
    env = {"PGDATABASE": parts.path.lstrip("/"), "PGUSER": parts.username or "postgres"}
    host = parse_qs(parts.query).get("host", [parts.hostname or "127.0.0.1"])[0]
    env["PGHOST"] = host
    if parts.port:
        env["PGPORT"] = str(parts.port)
    return env


async def _migrate(database_url: str) -> None:
    process = await asyncio.create_subprocess_exec(
        PYTHON, "-m", "microapp", "migrate", "custom-lang", "--database-url", database_url,
        cwd=ROOT, stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    if await process.wait() != 0:
        raise RuntimeError("microapp migrate custom-lang failed")


@dataclass(frozen=True)
class Target:
    """One server to measure: how to start it, and the database it writes to (if any)."""

    label: str
    argv: Sequence[str]
    env: Mapping[str, str]
    database_url: str | None


async def measure(target: Target, args: argparse.Namespace) -> Row:
    """Start the target, drive it with wrk, stop it; count the rows this run stored."""
    port = free_port()
    argv = [a.replace("{port}", str(port)) for a in target.argv]
    count = target.database_url and (lambda: _count_rows(target.database_url or ""))
    before = await asyncio.to_thread(count) if count else 0
    async with serving(target.label, argv, port, {**target.env, "PORT": str(port)}):
        await wait_http(f"http://127.0.0.1:{port}/healthz")
        result = await run_wrk(
            f"http://127.0.0.1:{port}/invoke",
            threads=args.threads,
            connections=args.connections,
            duration_s=args.duration,
        )
    stored = (await asyncio.to_thread(count)) - before if count else None
    print(
        f"  {target.label:48} {result.requests_per_s:8.0f} req/s  p50 {result.p50_ms:6.2f} ms"
        f"  p99 {result.p99_ms:6.2f} ms  errors {result.errors}  rows {stored}",
        flush=True,
    )
    return Row(target.label, result, stored)


def _custom_lang(server: str, database_url: str | None, coalesce: str) -> Target:
    argv = microapp_serve("custom-lang", 0, server)
    argv[argv.index("--port") + 1] = "{port}"
    env = {**SERVICE_ENV, "ACCESS_LOG": "0"}
    if database_url is None:
        return Target(f"custom-lang on {server}, no database", argv, env, None)
    env |= {"DATABASE_URL": database_url, "DB_COALESCE": "1" if coalesce == "on" else "0"}
    return Target(f"custom-lang on {server}, coalescing {coalesce}", argv, env, database_url)


async def main_async(args: argparse.Namespace) -> list[Row]:
    servers = [s for s in args.servers.split(",") if s]
    databases = ["express_db"] + [f"lang_{s}_{c}" for s in servers for c in ("on", "off")]
    best: dict[str, Row] = {}
    async with embedded_postgres(databases) as pg:
        url = pg.url  # type: ignore[attr-defined]
        for database in databases:
            await _migrate(url(database))
        targets = [
            Target(
                "Express 5 + node-postgres",
                ["node", str(EXPRESS_DIR / "server.js")],
                _node_env(url("express_db")),
                url("express_db"),
            ),
            *(
                _custom_lang(server, url(f"lang_{server}_{c}"), c)
                for server in servers
                for c in ("on", "off")
            ),
            _custom_lang(servers[0], None, "off"),
        ]
        for round_ in range(1, args.rounds + 1):
            print(f"round {round_} of {args.rounds}", flush=True)
            for target in targets:
                try:
                    row = await measure(target, args)
                except (RuntimeError, TimeoutError, subprocess.CalledProcessError) as exc:
                    # One server option that does not start must not cost the others.
                    print(f"  {target.label:48} failed: {str(exc).splitlines()[0]}", flush=True)
                    continue
                kept = best.get(target.label)
                if kept is None or row.result.requests_per_s > kept.result.requests_per_s:
                    best[target.label] = row
    rows = [best[t.label] for t in targets if t.label in best]
    express = best["Express 5 + node-postgres"].result.requests_per_s
    print(f"\n  best of {args.rounds}, relative to Express:")
    for row in rows:
        print(
            f"  {row.label:48} {row.result.requests_per_s:8.0f} req/s"
            f"  {row.result.requests_per_s / express:5.2f}  p99 {row.result.p99_ms:6.2f} ms"
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", default=",".join(SERVER_OPTIONS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=int, default=10, help="seconds per run")
    parser.add_argument("--rounds", type=int, default=2, help="runs per target; the best is kept")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        parser.error("wrk is not installed (apt-get install wrk)")
    if not (EXPRESS_DIR / "node_modules").is_dir():
        parser.error(f"run `npm install` in {EXPRESS_DIR} first")
    rows = asyncio.run(main_async(args))
    if args.out:
        args.out.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
