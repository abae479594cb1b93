"""greeter.v2 beside v1: locales, trace ids, and the server-streaming GreetStream over Connect
(HTTP/1.1 and h2c), gRPC and gRPC-Web, on Hypercorn and on pyvoy; Connect and gRPC-Web on Granian.

Real processes throughout: caller and greeter (`microapp serve`), the external target, PostgreSQL,
`buf curl` and grpcio as clients. That the server stopped a stream is read from its log line
"stream cancelled after N of M messages", awaited, never slept on.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from microapp.gen.greeter.v2.greeter_connect import GreeterServiceClient
from microapp.gen.greeter.v2.greeter_pb2 import (
    GreetRequest,
    GreetStreamRequest,
    GreetStreamResponse,
)
from tests.support.commands import BIN, Completed, buf_curl, run
from tests.support.external import ExternalServer
from tests.support.otlp import OtlpReceiver
from tests.support.polling import eventually
from tests.support.ports import free_port
from tests.support.postgres import TestPostgres, query
from tests.support.services import ServiceProcess

EXTERNAL_BODY = 4321
SERVICE = "/greeter.v2.GreeterService"
STREAM_PATH = f"{SERVICE}/GreetStream"
SERVERS = ["hypercorn", "pyvoy"]
PROTOS = str(Path(__file__).resolve().parent.parent / "proto")
STOPPED = re.compile(r"stream (cancelled|deadline_exceeded) after (\d+) of (\d+) messages")


@dataclass
class Greeter:
    server: str
    service: ServiceProcess
    database: str
    external: ExternalServer

    def stops(self) -> list[tuple[str, int, int]]:
        """The streams this greeter stopped early: (reason, messages sent, count asked)."""
        return [(m[1], int(m[2]), int(m[3])) for m in STOPPED.finditer(self.service.logs())]

    async def next_stop(self, seen: int) -> tuple[str, int, int]:
        """Await the log line of the stream stopped after the `seen` ones before it."""
        stops = await eventually(lambda: self.stops()[seen:])
        return stops[0]

    def greetings(self, name: str) -> list[tuple[object, ...]]:
        return query(
            self.database, "SELECT message, external_status FROM greetings WHERE name = %s", (name,)
        )


@pytest.fixture(scope="module")
async def caller(postgres: TestPostgres) -> AsyncIterator[ServiceProcess]:
    env = {"DATABASE_URL": postgres.fresh_database("caller_v2")}
    async with ServiceProcess("caller", env) as service:
        await service.wait_for("/healthz", 200)
        yield service


@contextlib.asynccontextmanager
async def greeter_on(
    server: str, postgres: TestPostgres, external: ExternalServer, caller: ServiceProcess
) -> AsyncIterator[Greeter]:
    """A greeter process under `server` (MICROAPP_SERVER), with its own database."""
    database = postgres.fresh_database(f"greeter_v2_{server}")
    env = {
        "MICROAPP_SERVER": server,
        "DATABASE_URL": database,
        "CALLER_BASE_URL": caller.url,
        "EXTERNAL_API_URL": external.url(status=200, size=EXTERNAL_BODY),
    }
    async with ServiceProcess("greeter", env) as service:
        await service.wait_for("/healthz", 200)
        yield Greeter(server, service, database, external)


@pytest.fixture(scope="module", params=SERVERS)
async def greeter(
    request: pytest.FixtureRequest,
    postgres: TestPostgres,
    external: ExternalServer,
    caller: ServiceProcess,
) -> AsyncIterator[Greeter]:
    async with greeter_on(request.param, postgres, external, caller) as started:
        yield started


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


# --- Greet ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("locale", "expected"),
    [
        ("", "Hello Ada from greeter-service!"),
        ("en", "Hello Ada from greeter-service!"),
        ("ja", "こんにちは、Adaさん。greeter-service より!"),
        ("fr", "Bonjour Ada de la part de greeter-service !"),
        ("es", "¡Hola Ada desde greeter-service!"),
        ("de", "Hallo Ada von greeter-service!"),
    ],
)
async def test_greet_answers_in_the_requested_locale(
    greeter: Greeter, locale: str, expected: str
) -> None:
    async with GreeterServiceClient(greeter.service.url) as client:
        response = await client.greet(GreetRequest(name="Ada", locale=locale))
    assert response.message == expected
    assert response.external_status == 200
    assert response.external_body_length == EXTERNAL_BODY


async def test_empty_name_greets_the_world_in_its_locale(greeter: Greeter) -> None:
    async with GreeterServiceClient(greeter.service.url) as client:
        response = await client.greet(GreetRequest(locale="de"))
    assert response.message == "Hallo Welt von greeter-service!"


async def test_unknown_locale_is_invalid_argument_listing_the_known_ones(greeter: Greeter) -> None:
    before = greeter.external.requests
    async with GreeterServiceClient(greeter.service.url) as client:
        with pytest.raises(ConnectError) as caught:
            await client.greet(GreetRequest(name="Ada", locale="xx"))
    assert caught.value.code == Code.INVALID_ARGUMENT
    assert caught.value.message == "unknown locale 'xx'; known locales: en, ja, fr, es, de"
    assert greeter.external.requests == before


async def test_greet_makes_one_caller_call_and_one_row(greeter: Greeter) -> None:
    name = unique("v2-row")
    before = greeter.external.requests
    async with GreeterServiceClient(greeter.service.url) as client:
        await client.greet(GreetRequest(name=name, locale="fr"))
    assert greeter.external.requests == before + 1
    assert greeter.greetings(name) == [(f"Bonjour {name} de la part de greeter-service !", 200)]


async def test_greet_without_telemetry_has_an_empty_trace_id(greeter: Greeter) -> None:
    async with GreeterServiceClient(greeter.service.url) as client:
        response = await client.greet(GreetRequest(name="Ada"))
    assert response.trace_id == ""


async def test_v1_is_still_served_beside_v2(greeter: Greeter) -> None:
    result = await buf_curl(
        f"{greeter.service.url}/greeter.v1.GreeterService/Greet", '{"name": "Old"}'
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["message"] == "Hello Old from greeter-service!"


async def test_caller_down_is_unavailable_without_its_address(external: ExternalServer) -> None:
    nothing_there = f"127.0.0.1:{free_port()}"
    env = {"CALLER_BASE_URL": f"http://{nothing_there}", "EXTERNAL_API_URL": external.url()}
    async with ServiceProcess("greeter", env) as service:
        async with GreeterServiceClient(service.url) as client:
            with pytest.raises(ConnectError) as caught:
                await client.greet(GreetRequest(name="alone"))
        assert caught.value.code == Code.UNAVAILABLE
        assert caught.value.message == "caller service failed"
        # The details are for the operator only.
        logged = await eventually(
            lambda: [
                line for line in service.logs().splitlines() if "caller service failed" in line
            ]
        )
    assert any(nothing_there in line for line in logged)


async def test_greet_answers_the_trace_it_ran_in(
    external: ExternalServer, caller: ServiceProcess
) -> None:
    receiver = OtlpReceiver()
    await receiver.start()
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "CALLER_BASE_URL": caller.url,
        "EXTERNAL_API_URL": external.url(),
    }
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    try:
        async with (
            ServiceProcess("greeter", env) as service,
            GreeterServiceClient(service.url) as client,
        ):
            response = await client.greet(
                GreetRequest(name="Traced"),
                headers={"traceparent": f"00-{trace_id}-{parent_id}-01"},
            )
    finally:
        await receiver.close()
    assert response.trace_id == trace_id


# --- GreetStream: validation ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "interval_ms", "complaint"),
    [
        (101, 0, "count must be between 1 and 100"),
        (-1, 0, "count must be between 1 and 100"),
        (3, 5001, "interval_ms must be between 0 and 5000"),
        (3, -1, "interval_ms must be between 0 and 5000"),
    ],
)
async def test_stream_arguments_out_of_range_are_invalid_argument(
    greeter: Greeter, count: int, interval_ms: int, complaint: str
) -> None:
    before = greeter.external.requests
    request = GreetStreamRequest(name="Ada", count=count, interval_ms=interval_ms)
    async with GreeterServiceClient(greeter.service.url) as client:
        with pytest.raises(ConnectError) as caught:
            async for _ in client.greet_stream(request):
                pass
    assert caught.value.code == Code.INVALID_ARGUMENT
    assert complaint in caught.value.message
    assert greeter.external.requests == before


async def test_stream_unknown_locale_is_invalid_argument(greeter: Greeter) -> None:
    async with GreeterServiceClient(greeter.service.url) as client:
        with pytest.raises(ConnectError) as caught:
            async for _ in client.greet_stream(GreetStreamRequest(locale="klingon")):
                pass
    assert caught.value.code == Code.INVALID_ARGUMENT
    assert "known locales: en, ja, fr, es, de" in caught.value.message


# --- GreetStream: buf curl -----------------------------------------------------------------


async def buf_curl_http1(url: str, data: str, *, protocol: str) -> Completed:
    """`buf curl` over HTTP/1.1 (what Granian speaks), schema from the repository's protos."""
    return await run(
        str(BIN / "buf"), "curl", "--protocol", protocol, "--schema", PROTOS, "-d", data, url
    )  # fmt: skip


def json_stream(text: str) -> list[dict[str, object]]:
    """The JSON objects `buf curl` prints one after another for a stream."""
    decoder = json.JSONDecoder()
    objects, position = [], 0
    text = text.strip()
    while position < len(text):
        value, position = decoder.raw_decode(text, position)
        objects.append(value)
        while position < len(text) and text[position].isspace():
            position += 1
    return objects


@pytest.mark.parametrize("protocol", ["connect", "grpc", "grpcweb"])
async def test_buf_curl_streams_count_messages_in_order(greeter: Greeter, protocol: str) -> None:
    name = unique(f"buf-{protocol}")
    before = greeter.external.requests
    request = json.dumps({"name": name, "locale": "es", "count": 4, "intervalMs": 10})
    result = await buf_curl(f"{greeter.service.url}{STREAM_PATH}", request, protocol=protocol)
    assert result.returncode == 0, result.stderr
    messages = json_stream(result.stdout)
    assert [m["sequence"] for m in messages] == [1, 2, 3, 4]
    assert {m["message"] for m in messages} == {f"¡Hola {name} desde greeter-service!"}
    assert {m["externalStatus"] for m in messages} == {200}
    assert {m["externalBodyLength"] for m in messages} == {str(EXTERNAL_BODY)}
    # One caller call and one greetings row for the whole stream.
    assert greeter.external.requests == before + 1
    assert len(greeter.greetings(name)) == 1


async def test_stream_count_defaults_to_five(greeter: Greeter) -> None:
    result = await buf_curl(f"{greeter.service.url}{STREAM_PATH}", '{"name": "Five"}')
    assert result.returncode == 0, result.stderr
    assert [m["sequence"] for m in json_stream(result.stdout)] == [1, 2, 3, 4, 5]


# --- GreetStream: grpcio -------------------------------------------------------------------


def grpc_stream(
    channel: grpc.aio.Channel,
) -> grpc.aio.UnaryStreamMultiCallable:
    """GreetStream through grpcio's generic API with our generated messages: no stubs needed."""
    return channel.unary_stream(
        STREAM_PATH,
        request_serializer=GreetStreamRequest.SerializeToString,
        response_deserializer=GreetStreamResponse.FromString,
    )


def grpc_target(greeter: Greeter) -> str:
    return f"127.0.0.1:{greeter.service.port}"


async def test_grpcio_streams_count_messages_in_order(greeter: Greeter) -> None:
    name = unique("grpcio")
    before = greeter.external.requests
    async with grpc.aio.insecure_channel(grpc_target(greeter)) as channel:
        call = grpc_stream(channel)(GreetStreamRequest(name=name, locale="ja", count=6))
        messages = [message async for message in call]
        assert await call.code() == grpc.StatusCode.OK
    assert [m.sequence for m in messages] == [1, 2, 3, 4, 5, 6]
    assert {m.message for m in messages} == {f"こんにちは、{name}さん。greeter-service より!"}
    assert greeter.external.requests == before + 1
    assert len(greeter.greetings(name)) == 1


async def test_grpcio_cancel_mid_stream_stops_the_servers_loop(greeter: Greeter) -> None:
    seen = len(greeter.stops())
    request = GreetStreamRequest(name="Quitter", count=100, interval_ms=200)
    received: list[int] = []
    async with grpc.aio.insecure_channel(grpc_target(greeter)) as channel:
        call = grpc_stream(channel)(request)
        async for message in call:
            received.append(message.sequence)
            if len(received) == 2:
                call.cancel()
                break
        reason, sent, count = await greeter.next_stop(seen)
    assert received == [1, 2]
    assert (reason, count) == ("cancelled", 100)
    assert 2 <= sent < 10


async def test_grpcio_deadline_ends_the_stream_with_deadline_exceeded(greeter: Greeter) -> None:
    seen = len(greeter.stops())
    request = GreetStreamRequest(name="Late", count=100, interval_ms=200)
    received: list[int] = []
    async with grpc.aio.insecure_channel(grpc_target(greeter)) as channel:
        call = grpc_stream(channel)(request, timeout=1.0)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for message in call:
                received.append(message.sequence)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 1 <= len(received) < 100
    _, sent, count = await greeter.next_stop(seen)
    assert count == 100 and sent < 100


# --- GreetStream: Connect over HTTP/1.1 ------------------------------------------------------


def connect_envelope(request: GreetStreamRequest) -> bytes:
    data = request.SerializeToString()
    return b"\x00" + len(data).to_bytes(4, "big") + data


async def read_connect_stream(
    response: aiohttp.ClientResponse,
) -> AsyncIterator[GreetStreamResponse | dict[str, object]]:
    """Each message of a Connect stream, then its end-of-stream JSON."""
    while True:
        header = await response.content.readexactly(5)
        data = await response.content.readexactly(int.from_bytes(header[1:], "big"))
        if header[0] & 0x02:
            yield json.loads(data)
            return
        yield GreetStreamResponse.FromString(data)


def connect_headers(timeout_ms: int | None = None) -> dict[str, str]:
    headers = {"Content-Type": "application/connect+proto", "Connect-Protocol-Version": "1"}
    if timeout_ms is not None:
        headers["Connect-Timeout-Ms"] = str(timeout_ms)
    return headers


async def test_connect_over_http1_streams_messages_as_they_are_produced(greeter: Greeter) -> None:
    request = GreetStreamRequest(name="Http1", count=3, interval_ms=50)
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{greeter.service.url}{STREAM_PATH}",
            data=connect_envelope(request),
            headers=connect_headers(),
        ) as response,
    ):
        assert response.version == aiohttp.HttpVersion11
        frames = [frame async for frame in read_connect_stream(response)]
    assert [f.sequence for f in frames[:-1] if isinstance(f, GreetStreamResponse)] == [1, 2, 3]
    assert frames[-1] == {}


async def read_two_then_disconnect(greeter: Greeter) -> list[int]:
    """Start a 100-greeting Connect stream over HTTP/1.1, read two, drop the connection."""
    request = GreetStreamRequest(name="Leaver", count=100, interval_ms=200)
    received: list[int] = []
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            f"{greeter.service.url}{STREAM_PATH}",
            data=connect_envelope(request),
            headers=connect_headers(),
        )
        async for frame in read_connect_stream(response):
            assert isinstance(frame, GreetStreamResponse)
            received.append(frame.sequence)
            if len(received) == 2:
                break
        # Drops the connection: the only way an HTTP/1.1 client can cancel.
        response.close()
    return received


async def test_connect_over_http1_disconnect_stops_the_servers_loop(greeter: Greeter) -> None:
    seen = len(greeter.stops())
    received = await read_two_then_disconnect(greeter)
    reason, sent, count = await greeter.next_stop(seen)
    assert received == [1, 2]
    assert (reason, count) == ("cancelled", 100)
    assert 2 <= sent < 10


async def test_connect_deadline_ends_the_stream_with_deadline_exceeded(greeter: Greeter) -> None:
    seen = len(greeter.stops())
    request = GreetStreamRequest(name="Slowpoke", count=100, interval_ms=200)
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{greeter.service.url}{STREAM_PATH}",
            data=connect_envelope(request),
            headers=connect_headers(timeout_ms=1000),
        ) as response,
    ):
        frames = [frame async for frame in read_connect_stream(response)]
    end = frames[-1]
    assert isinstance(end, dict)
    assert end["error"]["code"] == "deadline_exceeded"  # type: ignore[index]
    assert 1 <= len(frames) - 1 < 100
    assert await greeter.next_stop(seen) == ("deadline_exceeded", len(frames) - 1, 100)


# --- Granian: Connect and gRPC-Web only ------------------------------------------------------


@pytest.fixture(scope="module")
async def granian_greeter(
    postgres: TestPostgres, external: ExternalServer, caller: ServiceProcess
) -> AsyncIterator[Greeter]:
    async with greeter_on("granian", postgres, external, caller) as started:
        yield started


@pytest.mark.parametrize("protocol", ["connect", "grpcweb"])
async def test_granian_streams_over_connect_and_grpc_web(
    granian_greeter: Greeter, protocol: str
) -> None:
    url = f"{granian_greeter.service.url}{STREAM_PATH}"
    result = await buf_curl_http1(url, '{"count": 3}', protocol=protocol)
    assert result.returncode == 0, result.stderr
    assert [m["sequence"] for m in json_stream(result.stdout)] == [1, 2, 3]


async def test_granian_refuses_grpc_streams_clearly(granian_greeter: Greeter) -> None:
    url = f"{granian_greeter.service.url}{STREAM_PATH}"
    result = await buf_curl_http1(url, '{"count": 3}', protocol="grpc")
    assert result.returncode != 0
    assert "gRPC needs HTTP/2 trailers" in result.stdout + result.stderr


async def test_granian_disconnect_stops_the_servers_loop(granian_greeter: Greeter) -> None:
    seen = len(granian_greeter.stops())
    received = await read_two_then_disconnect(granian_greeter)
    reason, sent, count = await granian_greeter.next_stop(seen)
    assert received == [1, 2]
    assert (reason, count) == ("cancelled", 100)
    assert 2 <= sent < 10
