"""Hypercorn serving HTTP/1.1 and h2c (prior knowledge) on one port, stopping gracefully,
with limits that keep one hostile or broken client from hurting the others."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import cast

import h2.errors
import h2.events
import h2.exceptions
import h11
from h2.stream import StreamState
from hypercorn.asyncio import serve as hypercorn_serve  # pyright: ignore[reportUnknownVariableType]
from hypercorn.asyncio.tcp_server import MAX_RECV, TCPServer
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData
from hypercorn.protocol.events import EndBody, Response, StreamClosed
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.http_stream import HTTPStream
from hypercorn.typing import ASGIFramework
from starlette.types import ASGIApp

from microapp.platform.config import ConfigError, Settings, variable

# The `pyright: ignore`s in this module are for what it is for: it patches Hypercorn's
# private methods and keeps its own state on Hypercorn's objects (each patch's docstring
# says why), which a type checker rightly reports as private usage and unknown attributes.
# The one on the `serve` import: its WSGI alternative takes a bare, partly unknown `dict`.

logger = logging.getLogger(__name__)

MIB = 1024 * 1024


class HttpLimits(Settings):
    """What one client connection may do before the server cuts it off.

    The reasoning behind each default is in docs/operations.md ("Connection limits").
    """

    # Longest silence from a client while its connection is open (a stalled body, a
    # half-sent request); 0 turns it off.
    read_timeout_s: float = variable("HTTP_READ_TIMEOUT_S", 30.0, ge=0.0)
    # HTTP/2 rapid reset (CVE-2023-44487): client stream resets a connection may make at
    # once, refilled at this many per window; past it the client gets GOAWAY.
    h2_max_resets: int = variable("HTTP2_MAX_RESETS", 200, ge=1)
    h2_reset_window_s: float = variable("HTTP2_RESET_WINDOW_S", 30.0, gt=0.0)
    # HTTP/1.1: request body still to be read, after an early answer, that the server
    # reads and discards so the connection can carry the next request.
    h1_drain_max_bytes: int = variable("HTTP1_DRAIN_MAX_BYTES", 4 * MIB, ge=0)


@dataclass(frozen=True)
class ServerOptions:
    """How Hypercorn runs a service; the defaults suit long-lived service-to-service h2c."""

    host: str
    port: int
    # Hypercorn closes a connection after this many requests (default 1000), its only
    # bound against HTTP/2 rapid reset; under h2c load that showed as failed calls. The
    # reset budget in `limits` bounds rapid reset instead, so legitimate connections
    # may live as long as they like.
    keep_alive_max_requests: int = 1_000_000_000
    # In-flight requests get this long to finish after SIGTERM.
    graceful_timeout: float = 10.0
    h2_max_concurrent_streams: int = 1000
    use_uvloop: bool = True
    # "hypercorn" (the default) or the opt-in "granian" (see docs/benchmarks.md).
    server: str = "hypercorn"
    # None: `run` reads them from the environment (HttpLimits.from_env).
    limits: HttpLimits | None = None
    # A listening socket inherited from `run_workers` (its file descriptor), served
    # instead of binding host:port; host and port then only name it in the log.
    listen_fd: int | None = None


class _LimitedConfig(Config):
    """Hypercorn's config carrying our limits to the protocol guards below."""

    http_limits: HttpLimits | None = None


def hypercorn_config(options: ServerOptions) -> Config:
    """The Hypercorn configuration for one service, with the protocol guards installed."""
    install_protocol_guards()
    limits = options.limits or HttpLimits()
    config = _LimitedConfig()
    host = f"[{options.host}]" if ":" in options.host else options.host
    config.bind = [f"{host}:{options.port}"]
    if options.listen_fd is not None:
        config.bind = [f"fd://{options.listen_fd}"]
    config.keep_alive_max_requests = options.keep_alive_max_requests
    config.graceful_timeout = options.graceful_timeout
    config.h2_max_concurrent_streams = options.h2_max_concurrent_streams
    # Hypercorn annotates `read_timeout` as int, but any number of seconds works: it is
    # only handed to asyncio.wait_for.
    config.read_timeout = limits.read_timeout_s or None  # pyright: ignore[reportAttributeAccessIssue]
    config.http_limits = limits
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


def _limits(config: Config) -> HttpLimits | None:
    """The limits a guard enforces; None for a config not made by `hypercorn_config`."""
    return getattr(config, "http_limits", None)


class ResetBudget:
    """How many streams a client may still reset: `capacity` at once, given back at
    `capacity` per `window_s` and one per stream the server answered in full.

    The second refill is what keeps legitimate clients safe however long they live: a
    connection may always cancel as many streams as it let finish. A flood cannot use
    it to any effect, since each reset it earns costs a whole answered request, and
    those are bounded by MAX_CONCURRENT_STREAMS. The clock is injectable for exact tests.
    """

    def __init__(
        self, capacity: int, window_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._capacity = float(capacity)
        self._refill_per_s = capacity / window_s
        self._tokens = float(capacity)
        self._clock = clock
        self._last = clock()

    def try_reset(self) -> bool:
        """Take one reset from the budget; False when none is left."""
        self._refill(0.0)
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def stream_answered(self) -> None:
        """A stream ended normally: give one reset back."""
        self._refill(1.0)

    def _refill(self, extra: float) -> None:
        now = self._clock()
        earned = (now - self._last) * self._refill_per_s + extra
        self._tokens = min(self._capacity, self._tokens + earned)
        self._last = now


def install_protocol_guards() -> None:
    """Patch Hypercorn 0.18's protocol classes (once per process) with our guards.

    Hypercorn offers no hooks for these, so each guard wraps one method and delegates to
    the original for everything else; tests/test_http_limits.py and tests/test_fuzz.py pin
    the behaviour, so an upgrade that moves these methods fails there, not in production.
    """
    global _guards_installed
    if _guards_installed:
        return
    _guards_installed = True
    _ignore_body_frames_after_the_answer()
    _budget_h2_stream_resets()
    _drain_h11_bodies_answered_early()
    _unblock_streams_closed_with_unread_body()
    _read_timeout_only_while_a_body_is_owed()
    _coalesce_socket_writes()


_guards_installed = False

# Bytes a connection may hold back for its next write before it writes them at once and
# waits for the socket, as Hypercorn waited after each write.
_COALESCE_MAX_BYTES = 64 * 1024


def _coalesce_socket_writes() -> None:
    """Write what one turn of the event loop sends on a connection in one socket write.

    Hypercorn writes, and waits for the socket, once per frame batch it sends: an h2c
    Connect answer is two writes (HEADERS, DATA), a gRPC one three (and trailers), and
    connections multiplexing many streams make a system call per frame of each. Now
    the bytes are queued in order and written by one callback at the end of the loop's
    turn; past `_COALESCE_MAX_BYTES` queued, or with that much still unsent in the
    transport, they are written at once and the sender waits for the socket, which keeps
    Hypercorn's back-pressure. A connection closing writes what
    is queued first, so a GOAWAY or a last answer is never dropped.
    """
    protocol_send = TCPServer.protocol_send
    close = TCPServer._close  # pyright: ignore[reportPrivateUsage]

    async def _protocol_send(self: TCPServer, event: Event) -> None:
        if not isinstance(event, RawData):
            await protocol_send(self, event)
            return
        queued: list[bytes] | None = getattr(self, "_microapp_queued", None)
        if queued is None:
            queued = self._microapp_queued = []  # pyright: ignore[reportAttributeAccessIssue]
            self._microapp_queued_bytes = 0  # pyright: ignore[reportAttributeAccessIssue]
            self.loop.call_soon(_write_queued, self)
        queued.append(event.data)
        self._microapp_queued_bytes += len(event.data)  # pyright: ignore[reportAttributeAccessIssue, reportUnknownMemberType]
        too_much = self._microapp_queued_bytes > _COALESCE_MAX_BYTES  # pyright: ignore[reportAttributeAccessIssue, reportUnknownMemberType, reportUnknownVariableType]
        # A socket not keeping up (a slow reader) makes the sender wait, as before.
        if too_much or self.writer.transport.get_write_buffer_size() > _COALESCE_MAX_BYTES:
            async with self.send_lock:
                try:
                    _write_queued(self)
                    await self.writer.drain()
                except (ConnectionError, RuntimeError):
                    await self.protocol.handle(Closed())

    async def _close(self: TCPServer) -> None:
        _write_queued(self)
        await close(self)

    TCPServer.protocol_send = _protocol_send
    TCPServer._close = _close  # pyright: ignore[reportPrivateUsage]


def _write_queued(server: TCPServer) -> None:
    """Hand the connection's queued bytes to its transport in one write."""
    queued: list[bytes] | None = getattr(server, "_microapp_queued", None)
    if not queued:
        return
    server._microapp_queued = None  # pyright: ignore[reportAttributeAccessIssue]
    if server.writer.is_closing():
        return  # the connection is gone: nothing can be delivered
    server.writer.write(b"".join(queued))


def _ignore_body_frames_after_the_answer() -> None:
    """Keep an h2c connection alive when body frames arrive for a stream already answered.

    Hypercorn 0.18 looks such a stream up after closing it and the KeyError tears down
    the whole connection, failing every other request multiplexed on it (a proxy's, a
    service client's). A server may answer before reading the body (wrong content type,
    oversized body), so this is ordinary traffic. Upstream: pgjones/hypercorn#329.
    """
    handle_events = H2Protocol._handle_events  # pyright: ignore[reportPrivateUsage]

    async def _handle_events(self: H2Protocol, events: list[h2.events.Event]) -> None:
        # One event at a time: answering one event can close the stream the next is for.
        for event in events:
            if isinstance(event, h2.events.DataReceived) and event.stream_id not in self.streams:
                self.connection.acknowledge_received_data(
                    event.flow_controlled_length, event.stream_id
                )
                await self._flush()  # pyright: ignore[reportPrivateUsage]
                continue
            await handle_events(self, [event])

    H2Protocol._handle_events = _handle_events  # pyright: ignore[reportPrivateUsage]


# After GOAWAY the client may still have frames in flight: read and drop up to this much
# before closing, because closing a socket with unread data sends a TCP reset, which can
# destroy the GOAWAY before the client has read it.
_GOAWAY_LINGER_BYTES = 4 * MIB


@dataclass
class _ResetGuard:
    budget: ResetBudget
    goaway_sent: bool = False
    linger_left: int = _GOAWAY_LINGER_BYTES


_reset_guards: weakref.WeakKeyDictionary[H2Protocol, _ResetGuard] = weakref.WeakKeyDictionary()


def _budget_h2_stream_resets() -> None:
    """Answer an HTTP/2 rapid-reset flood (CVE-2023-44487) with GOAWAY(ENHANCE_YOUR_CALM).

    Each stream a client opens starts the app; resetting it at once frees the stream slot
    without waiting, so MAX_CONCURRENT_STREAMS bounds nothing. Hypercorn's only bound is
    closing after `keep_alive_max_requests`, which also cuts legitimate long-lived
    connections. Counting the client's resets instead leaves requests unbounded: a client
    that resets more than its `ResetBudget` allows is told to go away and cut off.
    """
    handle_events = H2Protocol._handle_events  # pyright: ignore[reportPrivateUsage]
    handle = H2Protocol.handle
    stream_send = H2Protocol.stream_send

    async def _handle_events(self: H2Protocol, events: list[h2.events.Event]) -> None:
        guard = _reset_guard(self)
        for event in events:
            if guard is not None and guard.goaway_sent:
                return
            if (
                guard is not None
                and isinstance(event, h2.events.StreamReset)
                and event.remote_reset
                and not guard.budget.try_reset()
            ):
                guard.goaway_sent = True
                self.connection.close_connection(
                    error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM,
                    last_stream_id=event.stream_id,
                    additional_data=b"too many stream resets",
                )
                await self._flush()  # pyright: ignore[reportPrivateUsage]
                logger.warning(
                    "too many HTTP/2 stream resets: sent GOAWAY",
                    extra={"client": _peer(self.client)},
                )
                return
            await handle_events(self, [event])

    async def _stream_send(self: H2Protocol, event: StreamEvent) -> None:
        # A stream the client reset has left `streams` already, and its app may still
        # finish later: only a stream that is still open was answered to the client.
        if (
            isinstance(event, StreamClosed)
            and event.stream_id in self.streams
            and (guard := _reset_guard(self)) is not None
        ):
            guard.budget.stream_answered()
        if isinstance(event, StreamClosed):
            await _stop_an_unread_request(self, event.stream_id)
        await stream_send(self, event)

    async def _handle(self: H2Protocol, event: Event) -> None:
        guard = _reset_guards.get(self)
        if guard is not None and guard.goaway_sent and isinstance(event, RawData):
            # The connection state is closed: parsing more frames would only fail.
            guard.linger_left -= len(event.data)
            if guard.linger_left < 0:
                await self.send(Closed())
            return
        await handle(self, event)
        if isinstance(event, Closed):
            # Hypercorn's sender stops here, and an app still answering (a read timeout,
            # a client gone) would wait on its stream's buffer forever, keeping the
            # connection's task group, and so its socket, open.
            for buffer in list(self.stream_buffers.values()):
                await buffer.close()

    H2Protocol._handle_events = _handle_events  # pyright: ignore[reportPrivateUsage]
    H2Protocol.handle = _handle
    H2Protocol.stream_send = _stream_send


async def _stop_an_unread_request(protocol: H2Protocol, stream_id: int) -> None:
    """After a complete answer to a request still being sent, tell the client to stop.

    RFC 9113 section 8.1: a server may answer before the whole request arrived, then ask
    the client to abort its transmission with RST_STREAM(NO_ERROR), as gRPC servers do.
    Without it the client keeps sending (a 1 MiB message refused as too large), and h2
    answers those frames with RST_STREAM(STREAM_CLOSED), which grpcio reports as
    `internal` instead of the answer it was given.
    """
    h2_stream = protocol.connection.streams.get(stream_id)
    if h2_stream is None or h2_stream.state_machine.state != StreamState.HALF_CLOSED_LOCAL:
        return
    try:
        protocol.connection.reset_stream(stream_id, error_code=h2.errors.ErrorCodes.NO_ERROR)
    except h2.exceptions.ProtocolError:
        return  # closed meanwhile: nothing left to stop
    await protocol._flush()  # pyright: ignore[reportPrivateUsage]


def _reset_guard(protocol: H2Protocol) -> _ResetGuard | None:
    """The connection's reset budget, made on first use from its config's limits."""
    guard = _reset_guards.get(protocol)
    if guard is None:
        limits = _limits(protocol.config)
        if limits is None:
            return None
        guard = _ResetGuard(ResetBudget(limits.h2_max_resets, limits.h2_reset_window_s))
        _reset_guards[protocol] = guard
    return guard


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "unknown"


@dataclass
class _Drain:
    """An HTTP/1.1 request answered before its body was read: what may still be read."""

    left: int


_declared_lengths: weakref.WeakKeyDictionary[H11Protocol, int | None] = weakref.WeakKeyDictionary()
_drains: weakref.WeakKeyDictionary[H11Protocol, _Drain] = weakref.WeakKeyDictionary()


def _drain_h11_bodies_answered_early() -> None:
    """Over HTTP/1.1, read and discard the rest of a request body the app answered early.

    connectrpc answers `resource_exhausted` as soon as a message passes its limit, and
    Starlette routes may answer before reading at all. Hypercorn then closed the socket
    with the body's rest unread, so the kernel reset the connection: the client saw EPIPE
    (or ECONNRESET) instead of the answer, and a keep-alive pool (connect-node's) failed
    its next calls on the dead socket. Now the server reads up to `h1_drain_max_bytes`
    of the rest and keeps the connection; when the body is longer than that, or of
    unknown length, the answer says `Connection: close` and the server still reads (up to
    the same bound) before closing, so the client gets the whole answer either way.
    """
    create_stream = H11Protocol._create_stream  # pyright: ignore[reportPrivateUsage]
    stream_send = H11Protocol.stream_send
    maybe_recycle = H11Protocol._maybe_recycle  # pyright: ignore[reportPrivateUsage]
    handle = H11Protocol.handle

    async def _create_stream(self: H11Protocol, request: h11.Request) -> None:
        _declared_lengths[self] = _content_length(request)
        await create_stream(self, request)

    async def _stream_send(self: H11Protocol, event: StreamEvent) -> None:
        limits = _limits(self.config)
        if (
            limits is not None
            and isinstance(event, Response)
            and event.status_code >= 200
            and self.connection.their_state is h11.SEND_BODY
        ):
            declared = _declared_lengths.get(self)
            if declared is None or declared > limits.h1_drain_max_bytes:
                event = replace(event, headers=[*event.headers, (b"connection", b"close")])
        await stream_send(self, event)

    async def _maybe_recycle(self: H11Protocol) -> None:
        limits = _limits(self.config)
        if (
            limits is not None
            and not self.context.terminated.is_set()
            and self.connection.their_state is h11.SEND_BODY
            and self.connection.our_state in {h11.DONE, h11.MUST_CLOSE}
        ):
            await self._close_stream()  # pyright: ignore[reportPrivateUsage]
            _drains[self] = _Drain(limits.h1_drain_max_bytes)
            await _drain(self)
            return
        await maybe_recycle(self)

    async def _drain(self: H11Protocol) -> bool:
        """Discard what has arrived of the unread body; True once the connection is
        ready for its next request."""
        drain = _drains[self]
        while True:
            if self.connection.their_state is h11.DONE:
                del _drains[self]
                await maybe_recycle(self)  # recycles, or closes after `Connection: close`
                return self.connection.our_state is h11.IDLE
            try:
                event = self.connection.next_event()
            except h11.RemoteProtocolError:
                event = None
            if event is h11.NEED_DATA:
                return False
            if isinstance(event, h11.Data):
                drain.left -= len(event.data)
                if drain.left >= 0:
                    continue
            elif isinstance(event, h11.EndOfMessage):
                continue
            # Too much, a broken body, or the client went away: close (the answer is out).
            del _drains[self]
            await self.send(Closed())
            return False

    async def _handle(self: H11Protocol, event: Event) -> None:
        if isinstance(event, RawData) and self in _drains:
            self.connection.receive_data(event.data)
            if await _drain(self):
                # A request that came right behind the body.
                await self._handle_events()  # pyright: ignore[reportPrivateUsage]
            return
        await handle(self, event)

    H11Protocol._create_stream = _create_stream  # pyright: ignore[reportPrivateUsage]
    H11Protocol.stream_send = _stream_send
    H11Protocol._maybe_recycle = _maybe_recycle  # pyright: ignore[reportPrivateUsage]
    H11Protocol.handle = _handle


def _content_length(request: h11.Request) -> int | None:
    """The request body's declared length; None when chunked (h11 validated the value)."""
    for name, value in request.headers:
        if name == b"content-length":
            return int(value)
    return None


def _unblock_streams_closed_with_unread_body() -> None:
    """Let a stream close even when its app stopped reading a body that kept arriving.

    Hypercorn queues body chunks for the app in a queue of `max_app_queue_size` and tells
    it of the end with one more put: when the app has answered without reading and the
    queue is full, both the connection's reader and the closing wait on that put forever
    (a dead connection, a task that never ends). The chunks are for an app that is done,
    so they are dropped.
    """
    handle = HTTPStream.handle

    async def _handle(self: HTTPStream, event: StreamEvent) -> None:
        if isinstance(event, StreamClosed) and not self.closed:
            queue = getattr(self.app_put, "__self__", None)
            if isinstance(queue, asyncio.Queue):
                while not queue.empty():
                    queue.get_nowait()
        await handle(self, event)

    HTTPStream.handle = _handle


def _read_timeout_only_while_a_body_is_owed() -> None:
    """Apply `read_timeout` only while a request's body is still arriving.

    Hypercorn times out every read of a connection, so it would also cut off a client
    that is rightly silent while the server answers: a server-streaming call (GreetStream
    sends for minutes), a slow handler. Idle connections are already closed by
    Hypercorn's keep-alive timer, so the read timeout is only needed while the client
    owes body bytes and the server owes nothing: the slow-body attack it is here for. A
    stream the server is answering keeps its connection's other streams alive, because a
    client's open request stream is not always a stalled one (`buf curl` keeps its
    reflection stream open while it makes the call it looked up).
    """
    handle = HTTPStream.handle

    async def _handle(self: HTTPStream, event: StreamEvent) -> None:
        if isinstance(event, EndBody):
            self._microapp_body_complete = True  # pyright: ignore[reportAttributeAccessIssue]
        await handle(self, event)

    HTTPStream.handle = _handle

    async def _read_data(self: TCPServer) -> None:
        # Hypercorn 0.18's loop, with the timeout chosen per read.
        while not self.reader.at_eof():
            timeout = self.config.read_timeout if _body_owed(self.protocol) else None
            try:
                data = await asyncio.wait_for(self.reader.read(MAX_RECV), timeout)
            except (ConnectionError, OSError, TimeoutError):
                break
            await self.protocol.handle(RawData(data))
        await self.protocol.handle(Closed())

    TCPServer._read_data = _read_data  # pyright: ignore[reportPrivateUsage]


def _body_owed(wrapper: object) -> bool:
    """True while this connection's streams all wait for request body bytes."""
    protocol = getattr(wrapper, "protocol", None)
    if isinstance(protocol, H2Protocol):
        streams: list[object] = list(protocol.streams.values())
    elif isinstance(protocol, H11Protocol):
        streams = [] if protocol.stream is None else [protocol.stream]
    else:
        return True  # not yet known (the first bytes): keep Hypercorn's behaviour
    owed = [not getattr(s, "_microapp_body_complete", False) for s in streams]
    return bool(owed) and all(owed)


async def serve_until_signalled(app: ASGIApp, options: ServerOptions) -> None:
    """Serve until SIGTERM or SIGINT, then stop accepting, finish in-flight requests,
    run the app's shutdown (which drains queues and closes pools) and return."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    logger.info(
        "listening", extra={"address": f"http://{options.host}:{options.port}", "pid": os.getpid()}
    )
    # Hypercorn types ASGI with its own TypedDicts, Starlette with plain mappings: the same
    # protocol in spellings a type checker cannot relate.
    framework = cast(ASGIFramework, app)
    await hypercorn_serve(framework, hypercorn_config(options), shutdown_trigger=stop.wait)
    logger.info("stopped")


async def serve_with_granian_until_signalled(app: ASGIApp, options: ServerOptions) -> None:
    """The opt-in server: Granian's HTTP/1.1 and h2c (Rust), embedded in this event loop.

    About three times Hypercorn's unary throughput here, but Granian offers no ASGI
    trailers, so it serves Connect and gRPC-Web and not gRPC; and its embedded mode is
    marked experimental.
    """
    from granian.constants import HTTPModes, Interfaces
    from granian.http import HTTP2Settings
    from granian.server.embed import Server

    server = Server(
        app,
        address=options.host,
        port=options.port,
        interface=Interfaces.ASGI,
        http=HTTPModes.auto,
        websockets=False,
        backlog=1024,
        log_enabled=False,
        http2_settings=HTTP2Settings(max_concurrent_streams=options.h2_max_concurrent_streams),
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stop)
    logger.info(
        "listening", extra={"address": f"http://{options.host}:{options.port}", "server": "granian"}
    )
    await server.serve()
    logger.info("stopped")


def run(app: ASGIApp, options: ServerOptions) -> None:
    """Run the event loop (uvloop when available) serving `app`; limits not given in
    `options` are read from the environment."""
    if options.limits is None:
        try:
            limits = HttpLimits.from_env(os.environ)
        except ConfigError as exc:
            # Like every other setting: the variable and the value, exit code 2.
            print(f"microapp serve: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        options = replace(options, limits=limits)
    serve = (
        serve_with_granian_until_signalled if options.server == "granian" else serve_until_signalled
    )
    if options.use_uvloop:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
            pass
        else:
            uvloop.run(serve(app, options))
            return
    asyncio.run(serve(app, options))


# Hypercorn's own listen backlog, kept for the socket `run_workers` binds for its workers.
_LISTEN_BACKLOG = 100


def bind_listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port that child processes can inherit."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.create_server((host, port), family=family, backlog=_LISTEN_BACKLOG)
    listener.set_inheritable(True)
    return listener


def run_workers(
    child_argv: Callable[[int], Sequence[str]], listener: socket.socket, workers: int
) -> int:
    """Serve with `workers` child processes sharing `listener`; the worst exit status.

    `child_argv(fd)` is the command of one worker serving the inherited socket `fd`
    (`microapp serve ... --listen-fd fd`). SIGTERM and SIGINT are passed on to every
    worker, which drains as a single process does. A worker that exits by itself stops
    the others, so that the service fails as a whole and its supervisor restarts it,
    rather than running on at a fraction of its capacity.
    """
    fd = listener.fileno()
    children: list[subprocess.Popen[bytes]] = []
    stopping = False

    def stop_all(sig: int = signal.SIGTERM) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(sig)

    def forward(sig: int, frame: object) -> None:
        stop_all(sig)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for _ in range(workers):
            children.append(subprocess.Popen(list(child_argv(fd)), pass_fds=(fd,)))
        listener.close()  # the workers hold it now
        logger.info("workers started", extra={"workers": [c.pid for c in children]})
        statuses = _wait_for_children(children, lambda: stopping, stop_all)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return max(statuses)


def _wait_for_children(
    children: Sequence[subprocess.Popen[bytes]],
    stopping: Callable[[], bool],
    stop_all: Callable[[], None],
) -> list[int]:
    """Wait until every child has exited; a child's exit unasked stops the rest."""
    by_pid = {child.pid: child for child in children}
    statuses: list[int] = []
    while by_pid:
        pid, wait_status = os.wait()  # signal handlers run while this waits
        child = by_pid.pop(pid, None)
        if child is None:
            continue
        child.returncode = os.waitstatus_to_exitcode(wait_status)
        # A worker killed by a signal exits as a shell reports it: 128 + the signal.
        status = child.returncode if child.returncode >= 0 else 128 - child.returncode
        if not stopping():
            status = max(status, 1)  # a worker must not end before it is asked to
            logger.error(
                "a worker exited; stopping the others", extra={"pid": pid, "status": status}
            )
            stop_all()
        statuses.append(status)
    return statuses
