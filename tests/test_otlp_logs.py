"""Log records over OTLP, to real receivers, over http/protobuf and over gRPC, carrying the
trace and span ids of the call they were written in."""

from __future__ import annotations

import json
import secrets
from typing import Protocol

import pytest

from microapp.gen.customlang.v1.customlang_connect import CustomLangServiceClient
from microapp.gen.customlang.v1.customlang_pb2 import InvokeRequest
from tests.support.otlp import OtlpGrpcReceiver, OtlpReceiver, ReceivedLog
from tests.support.polling import eventually
from tests.support.services import ServiceProcess

INVOKE = "/customlang.v1.CustomLangService/Invoke"


class LogReceiver(Protocol):
    endpoint: str
    logs: list[ReceivedLog]

    async def start(self) -> None: ...

    async def close(self) -> None: ...


def receiver_for(protocol: str) -> LogReceiver:
    return OtlpGrpcReceiver() if protocol == "grpc" else OtlpReceiver()


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
async def test_log_records_arrive_over_otlp_with_the_trace_of_their_call(protocol: str) -> None:
    receiver = receiver_for(protocol)
    await receiver.start()
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_BLRP_SCHEDULE_DELAY": "100",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    try:
        async with ServiceProcess("custom-lang", env) as lang:
            trace_id = secrets.token_hex(16)
            headers = {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}
            async with CustomLangServiceClient(lang.url) as client:
                await client.invoke(InvokeRequest(name="Ada"), headers=headers)

            def of_the_call() -> list[ReceivedLog]:
                return [log for log in receiver.logs if log.trace_id == trace_id]

            (record,) = await eventually(of_the_call)
            stderr = [json.loads(x) for x in lang.logs().splitlines() if x.startswith("{")]
    finally:
        await receiver.close()
    assert record.service == "custom-lang-service"
    assert record.body == f"{INVOKE} ok"
    assert record.attribute("procedure") == INVOKE
    assert record.attribute("code") == "ok"
    assert record.record.severity_text == "INFO"
    # The same line, on stderr too, with the same span.
    (line,) = [x for x in stderr if x.get("trace_id") == trace_id]
    assert record.span_id == line["span_id"] != "0" * 16
    started = [log for log in receiver.logs if log.body == "service started"]
    assert started, "records written outside any span arrive too"
