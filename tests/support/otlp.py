"""A real OTLP/HTTP receiver: decodes the protobuf export requests services send it."""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field

from aiohttp import web
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
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


@dataclass
class OtlpReceiver:
    """Listens on a loopback port; `endpoint` is what OTEL_EXPORTER_OTLP_ENDPOINT names."""

    port: int = field(default_factory=free_port)
    spans: list[ReceivedSpan] = field(default_factory=list)
    metric_names: dict[str, set[str]] = field(default_factory=dict)  # service → names
    # The last value received of each sum or gauge (histograms have no single value).
    metric_values: dict[str, float] = field(default_factory=dict)
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

    async def _other(self, request: web.Request) -> web.Response:
        await self._body(request)
        return web.Response(content_type="application/x-protobuf", body=b"")

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/traces", self._traces)
        app.router.add_post("/v1/metrics", self._metrics)
        app.router.add_post("/v1/logs", self._other)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def service_spans(self, service: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.service == service]


def _service_name(attributes: object) -> str:
    for kv in attributes:  # type: ignore[attr-defined]
        if kv.key == "service.name":
            return kv.value.string_value
    return ""
