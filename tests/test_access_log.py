"""The access log: one JSON line per request, from real service processes, with the trace
ids of the spans a real OTLP receiver gets."""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from microapp.gen.customlang.v1.customlang_connect import CustomLangServiceClient
from microapp.gen.customlang.v1.customlang_pb2 import InvokeRequest
from microapp.gen.greeter.v1.greeter_connect import GreeterServiceClient
from microapp.gen.greeter.v1.greeter_pb2 import GreetRequest
from tests.support.commands import buf_curl
from tests.support.external import ExternalServer
from tests.support.otlp import OtlpReceiver, ReceivedSpan
from tests.support.polling import eventually
from tests.support.services import ServiceProcess

FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_METRIC_EXPORT_INTERVAL": "300"}
GREET = "/greeter.v1.GreeterService/Greet"


@dataclass
class Logged:
    receiver: OtlpReceiver
    greeter: ServiceProcess


@pytest.fixture(scope="module")
async def logged(external: ExternalServer) -> AsyncIterator[Logged]:
    receiver = OtlpReceiver()
    await receiver.start()
    otel = {**FAST_EXPORT, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}
    async with ServiceProcess("caller", otel) as caller:
        env = {**otel, "CALLER_BASE_URL": caller.url, "EXTERNAL_API_URL": external.url()}
        async with ServiceProcess("greeter", env) as greeter:
            yield Logged(receiver, greeter)
    await receiver.close()


def access_lines(service: ServiceProcess) -> list[dict[str, object]]:
    lines = (json.loads(line) for line in service.logs().splitlines() if line.startswith("{"))
    return [line for line in lines if line.get("logger") == "microapp.access"]


async def greet_in_trace(logged: Logged, name: str) -> str:
    """Greet inside a trace the test starts; return its trace id (the call may fail)."""
    trace_id = secrets.token_hex(16)
    headers = {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}
    async with GreeterServiceClient(logged.greeter.url) as client:
        with contextlib.suppress(ConnectError):
            await client.greet(GreetRequest(name=name), headers=headers)
    return trace_id


async def line_of_trace(logged: Logged, trace_id: str) -> dict[str, object]:
    def found() -> list[dict[str, object]]:
        return [line for line in access_lines(logged.greeter) if line.get("trace_id") == trace_id]

    lines = await eventually(found)
    assert len(lines) == 1, lines
    return lines[0]


async def greeter_server_span(logged: Logged, trace_id: str) -> ReceivedSpan:
    def found() -> ReceivedSpan | None:
        return next(
            (
                s
                for s in logged.receiver.service_spans("greeter-service")
                if s.trace_id == trace_id and s.span.kind == Span.SPAN_KIND_SERVER
            ),
            None,
        )

    return await eventually(found)


async def test_a_greet_leaves_one_access_line_with_the_span_of_the_trace(logged: Logged) -> None:
    trace_id = await greet_in_trace(logged, "Ada")
    line = await line_of_trace(logged, trace_id)
    span = await greeter_server_span(logged, trace_id)
    assert line["span_id"] == span.span_id
    assert line["procedure"] == GREET
    assert line["protocol"] == "connect"
    assert line["codec"] == "proto"
    assert line["code"] == "ok"
    assert line["status"] == 200
    assert line["http_version"] in {"1.1", "2"}
    assert line["level"] == "INFO"
    assert isinstance(line["duration_ms"], float) and line["duration_ms"] > 0
    assert str(line["peer"]).startswith("127.0.0.1:")
    assert line["service"] == "greeter-service"


async def test_a_refused_greet_leaves_one_info_line_with_its_code(logged: Logged) -> None:
    trace_id = await greet_in_trace(logged, "x" * 300)
    line = await line_of_trace(logged, trace_id)
    span = await greeter_server_span(logged, trace_id)
    assert line["span_id"] == span.span_id
    assert line["code"] == "invalid_argument"
    assert line["status"] == 400
    assert line["level"] == "INFO"  # the caller's mistake, not a server fault


async def test_a_grpc_call_is_logged_with_its_protocol_codec_and_grpc_status(
    logged: Logged,
) -> None:
    result = await buf_curl(
        logged.greeter.url + GREET, json.dumps({"name": "x" * 300}), protocol="grpc"
    )
    assert result.returncode != 0  # refused: invalid_argument from the trailers

    def found() -> list[dict[str, object]]:
        return [
            line
            for line in access_lines(logged.greeter)
            if line.get("protocol") == "grpc" and line.get("procedure") == GREET
        ]

    (line,) = await eventually(found)
    assert line["codec"] == "proto"
    assert line["http_version"] == "2"
    assert line["code"] == "invalid_argument"
    assert line["status"] == 200  # gRPC answers 200 and puts its status in the trailers


async def test_health_probes_leave_no_line_and_other_routes_do(logged: Logged) -> None:
    async with aiohttp.ClientSession() as session:
        for path in ("/healthz", "/livez", "/healthz"):
            async with session.get(logged.greeter.url + path) as resp:
                assert resp.status == 200
        marker = f"/no-such-route-{secrets.token_hex(4)}"
        async with session.get(logged.greeter.url + marker) as resp:
            assert resp.status == 404

    def marked() -> list[dict[str, object]]:
        return [line for line in access_lines(logged.greeter) if line.get("route") == marker]

    (line,) = await eventually(marked)
    assert line["status"] == 404 and line["method"] == "GET" and "procedure" not in line
    # A REST line carries the ids of the route's HTTP server span.
    await eventually(lambda: any(s.span_id == line["span_id"] for s in logged.receiver.spans))
    routes = {line.get("route") for line in access_lines(logged.greeter)}
    assert not routes & {"/healthz", "/livez"}


async def test_server_faults_are_warnings_and_caller_errors_info() -> None:
    async with ServiceProcess("custom-lang") as lang:
        async with CustomLangServiceClient(lang.url) as client:
            for name, code in (("unavailable", Code.UNAVAILABLE), ("notfound", Code.NOT_FOUND)):
                with pytest.raises(ConnectError) as refused:
                    await client.invoke(InvokeRequest(name=name))
                assert refused.value.code == code
        invoke = {"name": "unavailable"}
        async with (
            aiohttp.ClientSession() as session,
            session.post(lang.url + "/invoke", json=invoke) as resp,
        ):
            assert resp.status == 503

        def three() -> list[dict[str, object]]:
            lines = access_lines(lang)
            return lines if len(lines) >= 3 else []

        rpc_fault, rpc_not_found, rest_fault = await eventually(three)
    assert (rpc_fault["code"], rpc_fault["level"]) == ("unavailable", "WARNING")
    assert (rpc_not_found["code"], rpc_not_found["level"]) == ("not_found", "INFO")
    assert rest_fault["route"] == "/invoke"
    assert (rest_fault["status"], rest_fault["level"]) == (503, "WARNING")


async def test_access_log_0_turns_the_lines_off() -> None:
    async with ServiceProcess("custom-lang", {"ACCESS_LOG": "0"}) as lang:
        async with CustomLangServiceClient(lang.url) as client:
            await client.invoke(InvokeRequest(name="quiet"))
        async with (
            aiohttp.ClientSession() as session,
            session.post(lang.url + "/invoke", json={"name": "quiet"}) as resp,
        ):
            assert resp.status == 200
    # The process has exited: every line it would have written is in.
    assert "service started" in lang.logs()
    assert access_lines(lang) == []


async def test_a_bad_access_log_value_stops_the_service_with_a_clear_message() -> None:
    service = ServiceProcess("custom-lang", {"ACCESS_LOG": "maybe"})
    with pytest.raises(RuntimeError, match="exited early"):
        await service.start()
    assert "ACCESS_LOG must be a boolean" in service.logs()
