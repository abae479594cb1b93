"""Traces, metrics and logs, received by a real OTLP/HTTP receiver from real service processes."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from microapp.gen.gateway.v1.gateway_connect import GatewayServiceClient
from microapp.gen.gateway.v1.gateway_pb2 import InvokeCustomRequest
from microapp.gen.greeter.v1.greeter_connect import GreeterServiceClient
from microapp.gen.greeter.v1.greeter_pb2 import GreetRequest
from tests.support.external import ExternalServer
from tests.support.otlp import OtlpReceiver, ReceivedSpan
from tests.support.polling import eventually
from tests.support.postgres import TestPostgres
from tests.support.services import ServiceProcess

FAST_EXPORT = {
    "OTEL_BSP_SCHEDULE_DELAY": "100",
    "OTEL_METRIC_EXPORT_INTERVAL": "300",
    "LOG_LEVEL": "DEBUG",
}


@dataclass
class Traced:
    receiver: OtlpReceiver
    greeter: ServiceProcess
    caller: ServiceProcess


@pytest.fixture(scope="module")
async def traced(postgres: TestPostgres, external: ExternalServer) -> AsyncIterator[Traced]:
    receiver = OtlpReceiver()
    await receiver.start()
    otel = {**FAST_EXPORT, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}
    caller_env = {**otel, "DATABASE_URL": postgres.fresh_database("otel_caller")}
    async with ServiceProcess("caller", caller_env) as caller:
        greeter_env = {
            **otel,
            "DATABASE_URL": postgres.fresh_database("otel_greeter"),
            "CALLER_BASE_URL": caller.url,
            "EXTERNAL_API_URL": external.url(size=3),
        }
        async with ServiceProcess("greeter", greeter_env) as greeter:
            await greeter.wait_for("/healthz", 200)
            await caller.wait_for("/healthz", 200)
            yield Traced(receiver, greeter, caller)
    await receiver.close()


async def _greet_traced(traced: Traced, name: str) -> str:
    """Greet once inside a trace the test starts (W3C traceparent); return its trace id."""
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    async with GreeterServiceClient(traced.greeter.url) as client:
        await client.greet(
            GreetRequest(name=name), headers={"traceparent": f"00-{trace_id}-{parent_id}-01"}
        )
    return trace_id


async def _span_of(
    traced: Traced, trace_id: str, service: str, kind: int, accept: Callable[[ReceivedSpan], bool]
) -> ReceivedSpan:
    def find() -> ReceivedSpan | None:
        return next(
            (
                s
                for s in traced.receiver.spans
                if s.trace_id == trace_id
                and s.service == service
                and s.span.kind == kind
                and accept(s)
            ),
            None,
        )

    return await eventually(find)


def _any(span: ReceivedSpan) -> bool:
    return True


async def test_one_greet_is_one_trace_across_greeter_and_caller(traced: Traced) -> None:
    trace_id = await _greet_traced(traced, "tracer")
    greeter_server = await _span_of(
        traced, trace_id, "greeter-service", Span.SPAN_KIND_SERVER, _any
    )
    caller_server = await _span_of(traced, trace_id, "caller-service", Span.SPAN_KIND_SERVER, _any)
    greeter_client = await _span_of(
        traced,
        trace_id,
        "greeter-service",
        Span.SPAN_KIND_CLIENT,
        lambda s: s.span_id == caller_server.parent_span_id,
    )
    assert greeter_client.span.name  # the caller's server span is a child of it
    assert "Greet" in str(greeter_server.attribute("rpc.method"))
    assert "CallExternal" in str(caller_server.attribute("rpc.method"))


def _is_database_span(span: ReceivedSpan) -> bool:
    return span.attribute("db.system") == "postgresql" or bool(span.attribute("db.system.name"))


async def test_greeter_database_insert_is_a_span_of_the_trace(traced: Traced) -> None:
    trace_id = await _greet_traced(traced, "db-span")
    insert = await _span_of(
        traced, trace_id, "greeter-service", Span.SPAN_KIND_CLIENT, _is_database_span
    )
    assert "INSERT" in str(insert.attribute("db.statement") or insert.attribute("db.query.text"))


async def test_caller_external_request_is_a_client_span_of_the_trace(traced: Traced) -> None:
    trace_id = await _greet_traced(traced, "external-span")
    span = await _span_of(
        traced,
        trace_id,
        "caller-service",
        Span.SPAN_KIND_CLIENT,
        lambda s: s.span.name.startswith("GET"),
    )
    assert span.span.name.startswith("GET")


async def test_metrics_arrive_with_the_documented_names(traced: Traced) -> None:
    async with GreeterServiceClient(traced.greeter.url) as client:
        await client.greet(GreetRequest(name="metrics"))
    expected = {
        "greeter-service": {"rpc.server.call.duration", "microapp.db.pool.size"},
        "caller-service": {
            "rpc.server.call.duration",
            "microapp.write_queue.depth",
            "microapp.write_queue.dropped",
            "microapp.db.pool.available",
        },
    }

    def arrived() -> bool:
        got = traced.receiver.metric_names
        return all(names <= got.get(service, set()) for service, names in expected.items())

    await eventually(arrived)


async def test_log_line_inside_a_handler_carries_the_trace_id(traced: Traced) -> None:
    trace_id = await _greet_traced(traced, "logged")
    lines = [
        json.loads(line) for line in traced.greeter.logs().splitlines() if line.startswith("{")
    ]
    greeted = [line for line in lines if line.get("greeted") == "logged"]
    assert greeted, "the greeter wrote no log line for this greeting"
    assert greeted[0]["trace_id"] == trace_id
    assert greeted[0]["span_id"]


async def test_without_an_endpoint_nothing_is_exported_and_nothing_warned(
    external: ExternalServer,
) -> None:
    # The SDK's default endpoint is 127.0.0.1:4318: listen there, so that an exporter set
    # up by mistake would be caught sending.
    receiver = OtlpReceiver(port=4318)
    try:
        await receiver.start()
    except OSError:
        pytest.skip("port 4318 is taken on this machine; cannot watch the default endpoint")
    try:
        async with ServiceProcess("caller", {"OTEL_METRIC_EXPORT_INTERVAL": "100"}) as caller:
            env = {"CALLER_BASE_URL": caller.url, "EXTERNAL_API_URL": external.url()}
            async with ServiceProcess("greeter", env) as greeter:
                async with GreeterServiceClient(greeter.url) as client:
                    for _ in range(5):
                        await client.greet(GreetRequest(name="quiet"))
                logs = greeter.logs() + caller.logs()
        # Both processes have exited: anything they would have flushed at exit is in.
        assert receiver.requests == 0
        levels = {json.loads(line)["level"] for line in logs.splitlines() if line.startswith("{")}
        assert levels <= {"INFO"}, logs
    finally:
        await receiver.close()


async def test_invoke_custom_is_one_trace_through_gateway_and_custom_lang(
    postgres: TestPostgres,
) -> None:
    receiver = OtlpReceiver()
    await receiver.start()
    otel = {**FAST_EXPORT, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}
    lang_env = {**otel, "DATABASE_URL": postgres.fresh_database("otel_lang")}
    try:
        async with ServiceProcess("custom-lang", lang_env) as lang:
            gateway_env = {
                **otel,
                "DATABASE_URL": postgres.fresh_database("otel_gateway"),
                "CUSTOM_LANG_BASE_URL": lang.url,
            }
            async with ServiceProcess("gateway", gateway_env) as gateway:
                await gateway.wait_for("/healthz", 200)
                await lang.wait_for("/healthz", 200)
                trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
                async with GatewayServiceClient(gateway.url) as client:
                    await client.invoke_custom(
                        InvokeCustomRequest(name="traced"),
                        headers={"traceparent": f"00-{trace_id}-{parent_id}-01"},
                    )
                traced = Traced(receiver, gateway, lang)
                gateway_server = await _span_of(
                    traced, trace_id, "gateway-service", Span.SPAN_KIND_SERVER, _any
                )
                lang_server = await _span_of(
                    traced, trace_id, "custom-lang-service", Span.SPAN_KIND_SERVER, _any
                )
                gateway_client = await _span_of(
                    traced,
                    trace_id,
                    "gateway-service",
                    Span.SPAN_KIND_CLIENT,
                    lambda s: s.span_id == lang_server.parent_span_id,
                )
                lang_insert = await _span_of(
                    traced,
                    trace_id,
                    "custom-lang-service",
                    Span.SPAN_KIND_CLIENT,
                    _is_database_span,
                )
    finally:
        await receiver.close()
    assert "InvokeCustom" in str(gateway_server.attribute("rpc.method"))
    assert gateway_client.span.name.startswith("POST")
    assert "executions" in str(
        lang_insert.attribute("db.statement") or lang_insert.attribute("db.query.text")
    )
