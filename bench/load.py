"""h2load as the load generator: one bounded run, parsed into throughput and percentiles.

h2load speaks h2c with prior knowledge to http:// URLs by default. Its summary gives
requests per second and failures; per-request latencies come from its --log-file, since
the summary has no percentiles.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

CONNECT_PROTO_HEADERS = ("content-type: application/proto", "connect-protocol-version: 1")
GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")


@dataclass(frozen=True)
class LoadShape:
    """How hard to push: connections, streams per connection, how long, and an optional rate."""

    connections: int = 8
    streams: int = 32
    duration_s: float = 8.0
    warmup_s: float = 1.0
    # Requests per second per connection; None means as fast as answers come (closed loop).
    rate_per_connection: float | None = None
    # A fixed number of requests instead of a duration.
    requests: int | None = None


@dataclass(frozen=True)
class LoadResult:
    """One h2load run."""

    requests_per_s: float
    succeeded: int
    failed: int
    non_2xx: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    # Seconds between the first and the last request started; well short of the
    # duration when the server closed the connections (h2load does not reconnect).
    active_s: float = 0.0
    stopped_early: bool = False

    def row(self) -> str:
        early = "  STOPPED EARLY: server closed the connections" if self.stopped_early else ""
        return (
            f"{self.requests_per_s:9.0f} req/s  p50 {self.p50_ms:7.2f} ms  "
            f"p99 {self.p99_ms:7.2f} ms  failed {self.failed + self.non_2xx}{early}"
        )


def h2load_path() -> str:
    """The h2load binary, or a clear message on how to get it."""
    path = shutil.which("h2load")
    if path is None:
        raise SystemExit("h2load not found: apt-get install -y nghttp2-client")
    return path


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message (uncompressed)."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


async def run_h2load(
    url: str, body: bytes, headers: tuple[str, ...], shape: LoadShape, *, timeout_s: float = 0.0
) -> LoadResult:
    """POST `body` to `url` under `shape`; stops by itself after the duration (and is
    killed if it overruns by `timeout_s`, default twice the duration plus 30 s)."""
    with tempfile.TemporaryDirectory(prefix="microapp-h2load-") as tmp:
        body_file = Path(tmp) / "body"
        body_file.write_bytes(body)
        log_file = Path(tmp) / "requests.tsv"
        args = [
            h2load_path(), url,
            "-c", str(shape.connections), "-m", str(shape.streams),
            "-d", str(body_file), f"--log-file={log_file}",
        ]  # fmt: skip
        if shape.requests is not None:
            args += ["-n", str(shape.requests)]
        else:
            args += ["-D", _duration(shape.duration_s)]
            args += ["--warm-up-time", _duration(shape.warmup_s)]
        if shape.rate_per_connection is not None:
            args += ["--rps", f"{shape.rate_per_connection:g}"]
        for header in headers:
            args += ["-H", header]
        proc = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        limit = timeout_s or (2 * (shape.duration_s + shape.warmup_s) + 30)
        try:
            async with asyncio.timeout(limit):
                out, _ = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        text = out.decode(errors="replace")
        if proc.returncode != 0:
            raise RuntimeError(f"h2load exited {proc.returncode}:\n{text[-2000:]}")
        result = _parse(text, log_file.read_text() if log_file.exists() else "")
        if shape.requests is not None:
            return result
        return replace(result, stopped_early=result.active_s < 0.8 * shape.duration_s)


def _duration(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


def _parse(summary: str, log: str) -> LoadResult:
    finished = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", summary)
    counts = re.search(r"requests: .*?(\d+) succeeded, (\d+) failed, (\d+) errored", summary)
    if finished is None or counts is None:
        raise RuntimeError(f"cannot read h2load's summary:\n{summary[-2000:]}")
    latencies: list[float] = []
    starts: list[int] = []
    non_2xx = 0
    for line in log.splitlines():
        fields = line.split("\t")
        if len(fields) < 3:
            continue
        starts.append(int(fields[0]))
        status, micros = int(fields[1]), int(fields[2])
        if status <= 0:
            continue  # cut off when the duration ended: no answer to time
        if not 200 <= status < 300:
            non_2xx += 1
        latencies.append(micros / 1000.0)
    latencies.sort()
    return LoadResult(
        requests_per_s=float(finished.group(1)),
        succeeded=int(counts.group(1)),
        failed=int(counts.group(2)) + int(counts.group(3)),
        non_2xx=non_2xx,
        p50_ms=percentile(latencies, 0.50),
        p99_ms=percentile(latencies, 0.99),
        max_ms=latencies[-1] if latencies else float("nan"),
        active_s=(max(starts) - min(starts)) / 1e6 if starts else 0.0,
    )
