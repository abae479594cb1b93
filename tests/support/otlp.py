"""Real OTLP receivers (HTTP, and gRPC for logs): decode the export requests services send."""

from __future__ import annotations

import gzip
from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc
from aiohttp import web
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2_grpc
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.support.ports import free_port


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    span: Span

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    @property
    def parent_span_id(self) -> str:
        return self.span.parent_span_id.hex()

    def attribute(self, key: str) -> object:
        for kv in self.span.attributes:
            if kv.key == key:
                value = kv.value
                return getattr(value, value.WhichOneof("value"))
        return None


@dataclass(frozen=True)
class ReceivedLog:
    service: str
    record: LogRecord

    @property
    def trace_id(self) -> str:
        return self.record.trace_id.hex()

    @property
    def span_id(self) -> str:
        return self.record.span_id.hex()

    @property
    def body(self) -> str:
        return self.record.body.string_value

    def attribute(self, key: str) -> object:
        return _attribute(self.record.attributes, key)


def _attribute(attributes: Iterable[KeyValue], key: str) -> object:
    for kv in attributes:
        if kv.key == key:
            value: AnyValue = kv.value
            return getattr(value, value.WhichOneof("value"))
    return None


def _logs_of(export: ExportLogsServiceRequest) -> list[ReceivedLog]:
    return [
        ReceivedLog(_service_name(resource_logs.resource.attributes), record)
        for resource_logs in export.resource_logs
        for scope_logs in resource_logs.scope_logs
        for record in scope_logs.log_records
    ]


@dataclass
class OtlpReceiver:
    """Listens on a loopback port; `endpoint` is what OTEL_EXPORTER_OTLP_ENDPOINT names."""

    port: int = field(default_factory=free_port)
    spans: list[ReceivedSpan] = field(default_factory=list)
    metric_names: dict[str, set[str]] = field(default_factory=dict)  # service → names
    # The last value received of each sum or gauge (histograms have no single value).
    metric_values: dict[str, float] = field(default_factory=dict)
    logs: list[ReceivedLog] = field(default_factory=list)
    requests: int = 0
    _runner: web.AppRunner | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _body(self, request: web.Request) -> bytes:
        self.requests += 1
        body = await request.read()
        if request.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        return body

    async def _traces(self, request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest.FromString(await self._body(request))
        for resource_spans in export.resource_spans:
            service = _service_name(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                self.spans += [ReceivedSpan(service, s) for s in scope_spans.spans]
        return web.Response(content_type="application/x-protobuf", body=b"")

    async def _metrics(self, request: web.Request) -> web.Response:
        export = ExportMetricsServiceRequest.FromString(await self._body(request))
        for resource_metrics in export.resource_metrics:
            service = _service_name(resource_metrics.resource.attributes)
            names = self.metric_names.setdefault(service, set())
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    names.add(metric.name)
                    kind = metric.WhichOneof("data")
                    if kind in {"sum", "gauge"}:
                        for point in getattr(metric, kind).data_points:
                            value = getattr(point, point.WhichOneof("value"))
                            self.metric_values[metric.name] = value
        return web.Response(content_type="application/x-protobuf", body=b"")

    async def _logs(self, request: web.Request) -> web.Response:
        self.logs += _logs_of(ExportLogsServiceRequest.FromString(await self._body(request)))
        return web.Response(content_type="application/x-protobuf", body=b"")

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/traces", self._traces)
        app.router.add_post("/v1/metrics", self._metrics)
        app.router.add_post("/v1/logs", self._logs)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def service_spans(self, service: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.service == service]


class OtlpGrpcReceiver(
    logs_service_pb2_grpc.LogsServiceServicer,
    trace_service_pb2_grpc.TraceServiceServicer,
    metrics_service_pb2_grpc.MetricsServiceServicer,
):
    """OTLP over gRPC (what OTEL_EXPORTER_OTLP_PROTOCOL=grpc sends), on a loopback port.

    Keeps the log records; traces and metrics are accepted and counted.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.logs: list[ReceivedLog] = []
        self.requests = 0
        self._server: grpc.aio.Server | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # One method for the three servicers: each generated servicer names it Export.
    async def Export(self, request: object, context: grpc.aio.ServicerContext) -> object:
        self.requests += 1
        if isinstance(request, ExportLogsServiceRequest):
            self.logs += _logs_of(request)
            return ExportLogsServiceResponse()
        if isinstance(request, ExportTraceServiceRequest):
            return ExportTraceServiceResponse()
        return ExportMetricsServiceResponse()

    async def start(self) -> None:
        self._server = grpc.aio.server()
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(self, self._server)
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(self, self._server)
        self._server.add_insecure_port(f"127.0.0.1:{self.port}")
        await self._server.start()

    async def close(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=None)


def _service_name(attributes: object) -> str:
    for kv in attributes:  # type: ignore[attr-defined]
        if kv.key == "service.name":
            return kv.value.string_value
    return ""
