"""`microapp load`: steady traffic on a running system, to watch the console, traces and
the gateway's breaker move.

Calls cycle through three targets: the greeter chain (`Greet`), the gateway (`InvokeCustom`
with a mix of names, some of which custom-lang answers with errors) and auth (`Login` of a
user registered at the start). Open loop (`--rate`: calls start on schedule whatever the
answers do) or closed loop (`--concurrency`: each worker waits for its answer), over
Connect or gRPC, on the services' own Connect clients over h2c.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TextIO

import aiohttp
from connectrpc.errors import ConnectError
from connectrpc.protocol import ProtocolType
from pyqwest import Client

from microapp.gen.auth.v1.auth_connect import AuthServiceClient
from microapp.gen.auth.v1.auth_pb2 import LoginRequest, RegisterRequest
from microapp.gen.gateway.v1.gateway_connect import GatewayServiceClient
from microapp.gen.gateway.v1.gateway_pb2 import InvokeCustomRequest
from microapp.gen.greeter.v1.greeter_connect import GreeterServiceClient
from microapp.gen.greeter.v1.greeter_pb2 import GreetRequest
from microapp.platform.clients import ServiceTransport
from microapp.services import SERVICES

TARGETS = ("greet", "invoke", "login")
# Logins hash a password (deliberately slow), so they come half as often as the others.
SCHEDULE = ("greet", "invoke", "greet", "invoke", "login")
# One name in four is one custom-lang answers with an error (docs/custom-lang.md): enough
# 429s and 503s to move the gateway's breaker.
INVOKE_NAMES = (
    "Ada", "Grace", "Linus", "ratelimit", "Alan", "Barbara", "Edsger", "unavailable",
    "Donald", "Ken", "Dennis", "notfound",
)  # fmt: skip
LOAD_EMAIL = "load@example.com"
LOAD_PASSWORD = "microapp load password"
# After the run, answers still on their way get this long before the summary.
DRAIN_S = 2.0
EPILOG = """\
examples:
  microapp load                              10 calls/s for 10 s against `microapp up`
  microapp load --rate 200 --duration 60     open loop: 200 calls started per second
  microapp load --concurrency 16 --duration 0   closed loop, until Ctrl-C
  microapp load --protocol grpc --targets invoke   only the gateway, over gRPC

Ctrl-C stops the run, prints the summary so far and exits 0. See docs/observability.md.
"""


def _default_url(service: str) -> str:
    return f"http://127.0.0.1:{SERVICES[service].default_port}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `microapp load` (also what `--help` shows)."""
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument(
        "--rate", type=positive(float), help="open loop: calls started per second (default: 10)"
    )
    pace.add_argument(
        "--concurrency", type=positive(int), help="closed loop: calls in flight at all times"
    )
    parser.add_argument(
        "--duration", type=_non_negative, default=10.0,
        help="seconds to run; 0 runs until Ctrl-C (default: 10)",
    )  # fmt: skip
    parser.add_argument(
        "--protocol", choices=["connect", "grpc"], default="connect",
        help="wire protocol (default: connect); both over h2c",
    )  # fmt: skip
    parser.add_argument(
        "--targets", type=_targets, default=TARGETS,
        help="comma-separated, from greet,invoke,login (default: all three)",
    )  # fmt: skip
    parser.add_argument(
        "--timeout", type=positive(float), default=5.0,
        help="seconds one call may take (default: 5)",
    )  # fmt: skip
    for service, target in (("greeter", "greet"), ("gateway", "invoke"), ("auth", "login")):
        parser.add_argument(
            f"--{service}", default=_default_url(service), metavar="URL",
            help=f"{service} base URL for {target} (default: {_default_url(service)})",
        )  # fmt: skip


def positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    """An argparse type: `kind` (int or float) that must be more than 0."""

    def parse(text: str) -> float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its errors
    return parse


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _targets(text: str) -> tuple[str, ...]:
    chosen = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in chosen if t not in TARGETS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"choose from {','.join(TARGETS)}, got {text!r}")
    return chosen


@dataclass
class TargetStats:
    """Answers of one target: how many, with which codes, how fast."""

    codes: Counter[str] = field(default_factory=Counter[str])
    latencies_ms: list[float] = field(default_factory=list[float])


@dataclass
class Stats:
    """Every answer of the run, and those of the current progress window."""

    targets: dict[str, TargetStats] = field(default_factory=dict[str, TargetStats])
    window_ms: list[float] = field(default_factory=list[float])
    sent: int = 0

    def record(self, target: str, code: str, latency_ms: float) -> None:
        stats = self.targets.setdefault(target, TargetStats())
        stats.codes[code] += 1
        stats.latencies_ms.append(latency_ms)
        self.window_ms.append(latency_ms)

    def codes(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for stats in self.targets.values():
            total.update(stats.codes)
        return total

    def answered(self) -> int:
        return sum(len(s.latencies_ms) for s in self.targets.values())


def percentile(values: Sequence[float], p: float) -> float:
    """The nearest-rank percentile (p in 0..100) of `values`; 0 when there are none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def _codes_text(codes: Counter[str]) -> str:
    return " ".join(f"{code}={n}" for code, n in codes.most_common())


class Calls:
    """The three calls, on one h2c transport per service."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.protocol = ProtocolType.GRPC if args.protocol == "grpc" else ProtocolType.CONNECT
        self._names = itertools.cycle(INVOKE_NAMES)
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> Calls:
        # Each transport is an async context manager, closed when the stack is left.
        async def client(url: str) -> Client:
            return (await self._stack.enter_async_context(ServiceTransport(url))).client

        args = self.args
        protocol = self.protocol
        self.greeter = GreeterServiceClient(
            args.greeter,
            http_client=await client(args.greeter),
            protocol=protocol,
            send_compression=None,
        )
        self.gateway = GatewayServiceClient(
            args.gateway,
            http_client=await client(args.gateway),
            protocol=protocol,
            send_compression=None,
        )
        self.auth = AuthServiceClient(
            args.auth, http_client=await client(args.auth), protocol=protocol, send_compression=None
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stack.aclose()

    def call(self, target: str, n: int) -> Awaitable[object]:
        timeout_ms = int(self.args.timeout * 1000)
        if target == "greet":
            return self.greeter.greet(GreetRequest(name=f"load-{n}"), timeout_ms=timeout_ms)
        if target == "invoke":
            request = InvokeCustomRequest(name=next(self._names))
            return self.gateway.invoke_custom(request, timeout_ms=timeout_ms)
        login = LoginRequest(email=LOAD_EMAIL, password=LOAD_PASSWORD)
        return self.auth.login(login, timeout_ms=timeout_ms)

    async def register(self) -> str:
        """Register the user the logins use; its code (already_exists is fine too)."""
        try:
            await self.auth.register(RegisterRequest(email=LOAD_EMAIL, password=LOAD_PASSWORD))
        except ConnectError as exc:
            return exc.code.value
        return "ok"


class Run:
    """One load run: the pacing, the answers, the progress line."""

    def __init__(self, args: argparse.Namespace, calls: Calls, err: TextIO) -> None:
        self.args = args
        self.calls = calls
        self.err = err
        self.stats = Stats()
        self.schedule = [t for t in SCHEDULE if t in args.targets]
        self.tty = err.isatty()
        self.started = self._last = 0.0
        self.in_flight: set[asyncio.Task[None]] = set()

    async def one(self, n: int) -> None:
        target = self.schedule[n % len(self.schedule)]
        began = time.perf_counter()
        try:
            await self.calls.call(target, n)
            code = "ok"
        except ConnectError as exc:
            code = exc.code.value
        except TimeoutError:
            code = "deadline_exceeded"
        except Exception as exc:  # any other failure is an answer too, counted by its kind
            code = type(exc).__name__
        self.stats.record(target, code, (time.perf_counter() - began) * 1000)

    async def open_loop(self, rate: float, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        for n in itertools.count():
            due = start + n / rate
            delay = due - loop.time()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                return
            self.stats.sent += 1
            task = asyncio.create_task(self.one(n))
            self.in_flight.add(task)
            task.add_done_callback(self.in_flight.discard)

    async def closed_loop(self, concurrency: int, stop: asyncio.Event) -> None:
        numbers = itertools.count()

        async def worker() -> None:
            while not stop.is_set():
                self.stats.sent += 1
                await self.one(next(numbers))

        workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
        self.in_flight.update(workers)
        await stop.wait()

    async def progress(self, stop: asyncio.Event) -> None:
        """Refresh the progress line about once a second until the run stops."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            self._show_progress()
        if self.tty:
            print(file=self.err, flush=True)

    def _show_progress(self) -> None:
        window, self.stats.window_ms = self.stats.window_ms, []
        now = time.perf_counter()
        elapsed = now - self.started
        line = (
            f"{elapsed:6.1f} s  rate {len(window) / max(now - self._last, 1e-9):7.1f}/s  "
            f"p50 {percentile(window, 50):7.1f} ms  p99 {percentile(window, 99):7.1f} ms  "
            f"{_codes_text(self.stats.codes())}"
        )
        self._last = now
        if self.tty:
            print(f"\r\033[K{line}", end="", file=self.err, flush=True)
        else:
            print(line, file=self.err, flush=True)

    async def drive(self, stop: asyncio.Event) -> float:
        """Run until `stop`; returns the seconds the calls took, drain included."""
        self.started = self._last = time.perf_counter()
        reporter = asyncio.create_task(self.progress(stop))
        if self.args.concurrency:
            await self.closed_loop(self.args.concurrency, stop)
        else:
            await self.open_loop(self.args.rate or 10.0, stop)
        if self.in_flight:
            _, pending = await asyncio.wait(set(self.in_flight), timeout=DRAIN_S)
            for task in pending:
                task.cancel()
        elapsed = time.perf_counter() - self.started
        await reporter
        return elapsed


def summary(args: argparse.Namespace, stats: Stats, elapsed: float, interrupted: bool) -> str:
    """The table printed at the end of a run."""
    pace = (
        f"closed loop, {args.concurrency} in flight"
        if args.concurrency
        else f"open loop, {args.rate or 10.0:g}/s requested"
    )
    achieved = stats.answered() / elapsed if elapsed > 0 else 0.0
    head = "interrupted after" if interrupted else "ran"
    lines = [
        f"microapp load: {head} {elapsed:.1f} s ({pace}, {args.protocol}): "
        f"achieved {achieved:.1f} req/s, {stats.answered()} answered of {stats.sent} sent",
        "",
        f"{'target':<8} {'calls':>7} {'rate/s':>8} {'p50 ms':>8} {'p99 ms':>8}  codes",
    ]
    rows = [(t, stats.targets[t]) for t in TARGETS if t in stats.targets]
    everything = TargetStats(stats.codes(), [x for _, s in rows for x in s.latencies_ms])
    for name, target in [*rows, ("total", everything)]:
        calls = len(target.latencies_ms)
        lines.append(
            f"{name:<8} {calls:>7} {calls / elapsed if elapsed else 0:>8.1f} "
            f"{percentile(target.latencies_ms, 50):>8.1f} "
            f"{percentile(target.latencies_ms, 99):>8.1f}  {_codes_text(target.codes)}"
        )
    return "\n".join(lines)


async def _unreachable(args: argparse.Namespace) -> list[str]:
    """The targets whose service does not answer /livez, as messages."""
    urls = {"greet": args.greeter, "invoke": args.gateway, "login": args.auth}
    problems: list[str] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session:
        for target in args.targets:
            try:
                async with session.get(urls[target] + "/livez") as resp:
                    if resp.status == 200:
                        continue
                    problems.append(f"{target}: {urls[target]}/livez answered {resp.status}")
            except (aiohttp.ClientError, TimeoutError) as exc:
                problems.append(f"{target}: {urls[target]} is not reachable ({exc or 'timeout'})")
    return problems


@contextlib.asynccontextmanager
async def _stop_on_signals(stop: asyncio.Event) -> AsyncGenerator[list[int], None]:
    """Set `stop` on SIGINT or SIGTERM; the signals received are listed."""
    loop = asyncio.get_running_loop()
    received: list[int] = []

    def handle(sig: int) -> None:
        received.append(sig)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, handle, sig)
    try:
        yield received
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _main(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    problems = await _unreachable(args)
    if problems:
        print("microapp load: " + "; ".join(problems), file=err)
        print("start the system first (`microapp up`) or pass its URLs", file=err)
        return 1
    stop = asyncio.Event()
    async with _stop_on_signals(stop) as received, Calls(args) as calls:
        if "login" in args.targets:
            code = await calls.register()
            if code not in {"ok", "already_exists"}:
                print(f"microapp load: registering {LOAD_EMAIL} answered {code}", file=err)
        run = Run(args, calls, err)
        timer = asyncio.get_running_loop().call_later(args.duration, stop.set)
        if not args.duration:
            timer.cancel()
        elapsed = await run.drive(stop)
        timer.cancel()
    print(summary(args, run.stats, elapsed, interrupted=bool(received)), file=out, flush=True)
    return 0


def run_load(args: argparse.Namespace) -> int:
    """Entry point of `microapp load`; 0 when the run ends, by its duration or by Ctrl-C."""
    return asyncio.run(_main(args, sys.stdout, sys.stderr))
