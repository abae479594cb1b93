"""HTTP/2 and HTTP/1.1 limits of the server (issue 13), against real `microapp serve
custom-lang` processes on Hypercorn, with raw clients that send exactly the frames and bytes
each test needs, and connect-node as an independent Connect client.

- a rapid-reset flood (HEADERS + RST_STREAM) is answered with GOAWAY(ENHANCE_YOUR_CALM)
  after the reset budget, while the service keeps serving new connections;
- a legitimate client making many requests on one h2c connection, cancelling a few, never
  sees a GOAWAY;
- a client that stalls in the middle of a body is cut off after HTTP_READ_TIMEOUT_S;
- a request answered before its body was read gets its answer, and over HTTP/1.1 its
  keep-alive connection carries the next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import h2.config
import h2.connection
import h2.events
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import Frame, GoAwayFrame

from microapp.platform.server import ResetBudget
from tests.support.commands import BIN, buf_curl, run
from tests.support.external import ExternalServer
from tests.support.node import require_node
from tests.support.polling import eventually
from tests.support.services import ServiceProcess

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = ROOT / "tests" / "clients"
INVOKE = "/customlang.v1.CustomLangService/Invoke"
MAX_BODY = 1024 * 1024  # CommonSettings.max_body_bytes: connectrpc's read_max_bytes
DRAIN = 4 * 1024 * 1024  # HttpLimits.h1_drain_max_bytes, the default
DEFAULT_RESETS = 200  # HTTP2_MAX_RESETS's default


@pytest.fixture(scope="module")
async def lang() -> AsyncIterator[ServiceProcess]:
    """custom-lang without a database, with the default limits."""
    async with ServiceProcess("custom-lang") as service:
        yield service


@pytest.fixture(scope="module")
async def impatient_lang() -> AsyncIterator[ServiceProcess]:
    """custom-lang that hangs up on a client silent for one second."""
    async with ServiceProcess("custom-lang", {"HTTP_READ_TIMEOUT_S": "1"}) as service:
        yield service


# ---------------------------------------------------------------------------- raw h2c


@dataclass
class H2c:
    """One client-side HTTP/2 connection with prior knowledge, over a plain socket."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    conn: h2.connection.H2Connection
    authority: str

    @classmethod
    async def open(cls, port: int) -> H2c:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        conn.initiate_connection()
        # A connection window that never fills, so flow control paces nothing here.
        conn.increment_flow_control_window(2**30)
        writer.write(conn.data_to_send())
        return cls(reader, writer, conn, f"127.0.0.1:{port}")

    def headers(self, method: str, path: str, *extra: tuple[str, str]) -> list[tuple[str, str]]:
        return [
            (":method", method),
            (":scheme", "http"),
            (":authority", self.authority),
            (":path", path),
            *extra,
        ]

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.writer.write(data)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


async def read_goaway(reader: asyncio.StreamReader) -> GoAwayFrame:
    """Read the server's frames (parsed one by one, no connection state) up to its GOAWAY."""
    while True:
        header = await reader.readexactly(9)
        frame, length = Frame.parse_frame_header(memoryview(header))
        frame.parse_body(memoryview(await reader.readexactly(length)))
        if isinstance(frame, GoAwayFrame):
            return frame


async def write_all(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Send `data`; a server that hangs up halfway is what some tests expect."""
    try:
        writer.write(data)
        await writer.drain()
    except ConnectionError:
        pass


@dataclass
class Outcome:
    answered: Counter[int]
    cancelled: int
    goaway: h2.events.ConnectionTerminated | None
    reset_by_server: int


async def make_requests(port: int, total: int, *, concurrency: int, cancel_every: int) -> Outcome:
    """GET /livez `total` times on one h2c connection, `concurrency` streams at a time;
    every `cancel_every`-th request is cancelled (RST_STREAM CANCEL) right after it is
    sent, as a client giving up on a call does. Stops early on a GOAWAY."""
    client = await H2c.open(port)
    livez = client.headers("GET", "/livez")
    in_flight: set[int] = set()
    answered: Counter[int] = Counter()
    cancelled = started = reset_by_server = 0
    goaway = None
    try:
        while goaway is None and (in_flight or started < total):
            while len(in_flight) < concurrency and started < total:
                stream_id = client.conn.get_next_available_stream_id()
                client.conn.send_headers(stream_id, livez, end_stream=True)
                started += 1
                if cancel_every and started % cancel_every == 0:
                    client.conn.reset_stream(stream_id, ErrorCodes.CANCEL)
                    cancelled += 1
                else:
                    in_flight.add(stream_id)
            client.flush()
            data = await client.reader.read(65536)
            assert data, f"the server closed the connection after {sum(answered.values())}"
            for event in client.conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    answered[int(dict(event.headers)[":status"])] += 1
                elif isinstance(event, h2.events.DataReceived):
                    client.conn.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
                elif isinstance(event, h2.events.StreamEnded):
                    in_flight.discard(event.stream_id)
                elif isinstance(event, h2.events.StreamReset):
                    in_flight.discard(event.stream_id)
                    reset_by_server += 1
                elif isinstance(event, h2.events.ConnectionTerminated):
                    goaway = event
            client.flush()
    finally:
        await client.close()
    return Outcome(answered, cancelled, goaway, reset_by_server)


async def invoke_h2(port: int, name: str) -> tuple[int, dict[str, str]]:
    """A Connect JSON call to custom-lang on a new h2c connection: (status, body)."""
    client = await H2c.open(port)
    try:
        body = json.dumps({"name": name}).encode()
        stream_id = client.conn.get_next_available_stream_id()
        client.conn.send_headers(
            stream_id,
            client.headers(
                "POST",
                INVOKE,
                ("content-type", "application/json"),
                ("content-length", str(len(body))),
            ),
        )
        client.conn.send_data(stream_id, body, end_stream=True)
        client.flush()
        status, received = 0, b""
        while True:
            data = await client.reader.read(65536)
            assert data, "the server closed the connection"
            for event in client.conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[":status"])
                elif isinstance(event, h2.events.DataReceived):
                    received += event.data
                elif isinstance(event, h2.events.StreamEnded):
                    return status, json.loads(received)
            client.flush()
    finally:
        await client.close()


# ---------------------------------------------------------------------------- rapid reset


async def reset_flood(port: int, streams: int) -> GoAwayFrame:
    """Open `streams` streams on one connection, resetting each at once (HEADERS +
    RST_STREAM, all written in one go), and return the GOAWAY the server answers with."""
    client = await H2c.open(port)
    livez = client.headers("GET", "/livez")
    for _ in range(streams):
        stream_id = client.conn.get_next_available_stream_id()
        client.conn.send_headers(stream_id, livez, end_stream=True)
        client.conn.reset_stream(stream_id, ErrorCodes.CANCEL)
    sending = asyncio.create_task(write_all(client.writer, client.conn.data_to_send()))
    try:
        return await asyncio.wait_for(read_goaway(client.reader), timeout=60)
    finally:
        await sending
        await client.close()


async def test_a_rapid_reset_flood_gets_goaway_after_the_reset_budget(lang: ServiceProcess) -> None:
    goaway = await reset_flood(lang.port, 20_000)

    assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert goaway.additional_data == b"too many stream resets"
    # Client streams are odd: the budget of 200 runs out at stream 401. A little slack
    # for resets given back while the flood is read; the flood itself ends at 39,999.
    assert goaway.last_stream_id < 4 * DEFAULT_RESETS
    await eventually(lambda: "too many HTTP/2 stream resets" in lang.logs())
    # The service goes on serving, on new connections.
    assert await invoke_h2(lang.port, "after-the-flood") == (
        200,
        {"message": "Hello after-the-flood from custom-lang-service!"},
    )


@pytest.fixture(scope="module")
async def frugal_lang() -> AsyncIterator[ServiceProcess]:
    """custom-lang with a tenth of the default reset budget (see below)."""
    env = {"HTTP2_MAX_RESETS": str(DEFAULT_RESETS * REQUESTS // 100_000)}
    async with ServiceProcess("custom-lang", env) as service:
        yield service


REQUESTS = 10_000
CANCEL_EVERY = 25


async def test_a_client_making_many_requests_and_cancelling_some_never_sees_goaway(
    frugal_lang: ServiceProcess,
) -> None:
    """The issue's legitimate client makes 100,000 requests on one connection. Pipelined
    100 at a time over raw h2 (the Python h2 stack on both ends), that took 182 s on the
    2-core machine (no GOAWAY, with 1,000 of them cancelled, at the default budget of 200),
    so the test makes a tenth of them (13 to 25 s here) against a service whose reset budget
    (HTTP2_MAX_RESETS) is scaled down in proportion, to 20. One request in 25 is
    cancelled: 400 cancellations, twenty times the budget at once; the streams the client
    lets finish give them back, so it never sees a GOAWAY."""
    outcome = await make_requests(
        frugal_lang.port, REQUESTS, concurrency=100, cancel_every=CANCEL_EVERY
    )
    assert outcome.goaway is None, f"GOAWAY after {sum(outcome.answered.values())} answers"
    assert outcome.reset_by_server == 0
    assert outcome.cancelled == REQUESTS // CANCEL_EVERY
    # A cancelled stream may have been answered before its cancel arrived; all others were.
    answered = sum(outcome.answered.values())
    assert REQUESTS - outcome.cancelled <= answered <= REQUESTS
    assert set(outcome.answered) == {200}


async def test_the_same_cancellations_without_answers_between_them_get_goaway(
    frugal_lang: ServiceProcess,
) -> None:
    # The control for the test above: the same service cuts off a client whose resets
    # are not paid for by answered streams, at its budget of 20 (stream 41).
    goaway = await reset_flood(frugal_lang.port, REQUESTS // CANCEL_EVERY)
    assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert goaway.last_stream_id < 4 * 20


async def test_a_limit_the_server_cannot_use_stops_it_with_the_variable_named() -> None:
    service = ServiceProcess("custom-lang", {"HTTP2_MAX_RESETS": "lots"})
    with pytest.raises(RuntimeError, match="exited early"):
        await service.start(timeout=30)
    assert await service.stop() == 2
    assert "HTTP2_MAX_RESETS must be an integer, got 'lots'" in service.logs()
    assert "Traceback" not in service.logs()


def test_the_reset_budget_is_given_back_by_answered_streams_and_by_time() -> None:
    now = [0.0]
    budget = ResetBudget(capacity=3, window_s=30.0, clock=lambda: now[0])
    assert [budget.try_reset() for _ in range(4)] == [True, True, True, False]
    budget.stream_answered()
    assert budget.try_reset()
    assert not budget.try_reset()
    now[0] += 10.0  # a third of the window: one reset back
    assert budget.try_reset()
    assert not budget.try_reset()
    now[0] += 3600.0  # never more than the capacity
    for _ in range(100):
        budget.stream_answered()
    assert [budget.try_reset() for _ in range(4)] == [True, True, True, False]


# ---------------------------------------------------------------------------- slow bodies


async def test_a_stalled_http1_body_is_cut_off_after_the_read_timeout(
    impatient_lang: ServiceProcess,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", impatient_lang.port)
    writer.write(
        f"POST {INVOKE} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        'content-length: 1000\r\n\r\n{"name": "'.encode()
    )
    await writer.drain()
    # Another client is served meanwhile.
    assert await invoke_h2(impatient_lang.port, "meanwhile") == (
        200,
        {"message": "Hello meanwhile from custom-lang-service!"},
    )
    # Nothing more is sent: the server hangs up (the bound is generous, the setting is 1 s).
    answer = await asyncio.wait_for(reader.read(), timeout=20)
    assert b"200" not in answer.split(b"\r\n", 1)[0]
    assert reader.at_eof()
    writer.close()
    assert await invoke_h2(impatient_lang.port, "afterwards") == (
        200,
        {"message": "Hello afterwards from custom-lang-service!"},
    )


async def test_a_stalled_h2_body_is_cut_off_after_the_read_timeout(
    impatient_lang: ServiceProcess,
) -> None:
    client = await H2c.open(impatient_lang.port)
    stream_id = client.conn.get_next_available_stream_id()
    client.conn.send_headers(
        stream_id,
        client.headers("POST", INVOKE, ("content-type", "application/json")),
    )
    client.conn.send_data(stream_id, b'{"name": "')
    client.flush()
    await client.writer.drain()

    async def until_closed() -> None:
        while await client.reader.read(65536):
            pass

    await asyncio.wait_for(until_closed(), timeout=20)
    await client.close()
    assert await invoke_h2(impatient_lang.port, "afterwards") == (
        200,
        {"message": "Hello afterwards from custom-lang-service!"},
    )


# ---------------------------------------------------------------------------- early answers


def oversized_request(size: int) -> bytes:
    """A Connect JSON call whose body is over the 1 MiB message limit."""
    body = json.dumps({"name": "x" * size}).encode()
    head = (
        f"POST {INVOKE} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def small_request(name: str) -> bytes:
    body = json.dumps({"name": name}).encode()
    head = (
        f"POST {INVOKE} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


@dataclass
class Http1Answer:
    status: int
    headers: dict[str, str]
    body: bytes


async def read_http1_answer(reader: asyncio.StreamReader) -> Http1Answer:
    """One HTTP/1.1 response, with a content-length or a chunked body."""
    status_line = await reader.readuntil(b"\r\n")
    headers: dict[str, str] = {}
    while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    else:
        body = b""
        while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        await reader.readexactly(2)
    return Http1Answer(int(status_line.split()[1]), headers, body)


async def test_an_http1_body_answered_early_is_drained_and_the_connection_serves_again(
    lang: ServiceProcess,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", lang.port)
    try:
        sending = asyncio.create_task(write_all(writer, oversized_request(2 * MAX_BODY)))
        answer = await read_http1_answer(reader)
        await sending
        assert answer.status == 429
        assert json.loads(answer.body)["code"] == "resource_exhausted"
        assert "connection" not in answer.headers  # keep-alive: the rest is read and dropped
        for i in range(3):
            writer.write(small_request(f"next-{i}"))
            again = await read_http1_answer(reader)
            assert (again.status, json.loads(again.body)) == (
                200,
                {"message": f"Hello next-{i} from custom-lang-service!"},
            )
    finally:
        writer.close()


async def test_an_http1_body_too_long_to_drain_gets_its_answer_and_connection_close(
    lang: ServiceProcess,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", lang.port)
    try:
        sending = asyncio.create_task(write_all(writer, oversized_request(3 * DRAIN)))
        answer = await read_http1_answer(reader)
        assert answer.status == 429
        assert json.loads(answer.body)["code"] == "resource_exhausted"
        assert answer.headers["connection"] == "close"
        await sending
        # The server hangs up after draining at most its bound (a reset, as data was left).
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(reader.read(), timeout=20) == b""
        assert reader.at_eof() or reader.exception() is not None
    finally:
        writer.close()


# ---------------------------------------------------------------------------- connect-node


def node_client_or_skip() -> str:
    """The `node` binary with tests/clients installed; skips (fails under CI) without."""
    return require_node(
        CLIENTS / "node_modules" / "@connectrpc" / "connect-node",
        hint="run `npm ci` in tests/clients",
    )


async def call_with_connect_node(
    base_url: str, requests: list[dict[str, str]], tmp_path: Path, *, http_version: str
) -> list[dict[str, object]]:
    """Send `requests` to custom-lang's Invoke, one after another on one connect-node
    transport (binary Connect), and return its results."""
    node = node_client_or_skip()
    schema = tmp_path / "schema.binpb"
    built = await run(str(BIN / "buf"), "build", str(ROOT), "-o", str(schema))
    assert built.returncode == 0, built.stderr
    requests_file = tmp_path / "requests.json"
    requests_file.write_text(json.dumps(requests))
    done = await run(
        node, str(CLIENTS / "call.mjs"),
        "--descriptor-set", str(schema),
        "--service", "customlang.v1.CustomLangService", "--method", "Invoke",
        "--base-url", base_url, "--protocol", "connect", "--http-version", http_version,
        "--binary", "--requests", str(requests_file),
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


async def test_connect_node_over_http1_gets_resource_exhausted_then_200_good_calls(
    lang: ServiceProcess, tmp_path: Path
) -> None:
    oversized = {"name": "x" * (2 * MAX_BODY)}
    good = [{"name": f"node-{i}"} for i in range(200)]
    results = await call_with_connect_node(
        lang.url, [oversized, *good], tmp_path, http_version="1.1"
    )
    assert results[0]["ok"] is False
    assert results[0]["code"] == "resource_exhausted", results[0]
    assert results[1:] == [
        {"ok": True, "response": {"message": f"Hello node-{i} from custom-lang-service!"}}
        for i in range(200)
    ]


async def test_a_silent_client_waiting_for_a_slow_answer_is_not_cut_off(
    external: ExternalServer,
) -> None:
    """The read timeout bounds a body that stops arriving, not a client waiting for its
    answer: caller takes 2.5 s (its target's delay) with HTTP_READ_TIMEOUT_S=1."""
    slow_target = external.url(size=7, delay=2.5)
    payload = json.dumps({"url": slow_target})
    async with ServiceProcess("caller", {"HTTP_READ_TIMEOUT_S": "1"}) as caller:
        url = caller.url + "/caller.v1.CallerService/CallExternal"
        headers = {"content-type": "application/json"}
        async with (
            aiohttp.ClientSession() as session,  # HTTP/1.1
            session.post(url, data=payload, headers=headers) as resp,
        ):
            assert resp.status == 200
            assert await resp.json() == {"statusCode": 200, "bodyLength": 7}
        h2 = await buf_curl(url, payload)
        assert h2.returncode == 0, h2.stderr
        assert json.loads(h2.stdout) == {"statusCode": 200, "bodyLength": 7}


async def test_a_grpc_request_answered_before_its_body_is_stopped_with_no_error(
    lang: ServiceProcess,
) -> None:
    """RFC 9113 8.1: after a complete answer to a request still being sent, the server
    asks the client to stop with RST_STREAM(NO_ERROR), as gRPC servers do. Without it the
    client goes on sending, h2 resets those frames with STREAM_CLOSED, and grpcio reported
    that as `internal` instead of the `resource_exhausted` it had been given."""
    client = await H2c.open(lang.port)
    stream_id = client.conn.get_next_available_stream_id()
    client.conn.send_headers(
        stream_id,
        client.headers("POST", INVOKE, ("content-type", "application/grpc"), ("te", "trailers")),
    )
    # A message that says it is 2 MiB long: refused from its length prefix alone.
    client.conn.send_data(stream_id, b"\x00" + (2 * MAX_BODY).to_bytes(4, "big") + b"x" * 1000)
    client.flush()
    trailers: dict[str, str] = {}
    reset: h2.events.StreamReset | None = None
    async with asyncio.timeout(10):
        while reset is None:
            data = await client.reader.read(65536)
            assert data, "the server closed the connection"
            for event in client.conn.receive_data(data):
                if isinstance(event, h2.events.TrailersReceived):
                    trailers = dict(event.headers)
                elif isinstance(event, h2.events.StreamReset):
                    reset = event
            client.flush()
    assert trailers.get("grpc-status") == "8", trailers  # resource_exhausted, answered first
    assert reset.error_code == ErrorCodes.NO_ERROR
    await client.close()
