"""OpenTelemetry: traces, metrics and logs over OTLP when an endpoint is set, nothing when not.

The SDK is set up by opentelemetry-distro from the standard `OTEL_*` variables; the
maintained instrumentations are switched on explicitly here: Connect clients and servers
(connectrpc-otel), aiohttp client requests, psycopg. Log records go to the collector
through OpenTelemetry's logging handler (beside the JSON lines on stderr), with the trace
and span ids of the span they were written in. Without `OTEL_EXPORTER_OTLP_ENDPOINT` none
of this runs: the API stays a no-op, so there is no exporter, no warning and no overhead.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, MutableMapping

from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation

logger = logging.getLogger(__name__)

_enabled = False


def telemetry_enabled() -> bool:
    """True once `configure_telemetry` has set up exporting in this process."""
    return _enabled


def configure_telemetry(service_name: str, env: MutableMapping[str, str] | None = None) -> bool:
    """Set up tracing and metrics export for this process; False when no endpoint is set."""
    global _enabled
    env = os.environ if env is None else env
    if not env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip():
        return False
    if _enabled:
        return True
    env.setdefault("OTEL_SERVICE_NAME", service_name)
    # OTLP over HTTP (port 4318) unless told otherwise: it needs no gRPC stack and
    # passes through every proxy. OTEL_LOGS_EXPORTER=none keeps logs on stderr only.
    env.setdefault("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    env.setdefault("OTEL_LOGS_EXPORTER", "otlp")

    from opentelemetry.distro import OpenTelemetryConfigurator, OpenTelemetryDistro

    # `configure(**kwargs)` is unannotated in the distro.
    OpenTelemetryDistro().configure()  # pyright: ignore[reportUnknownMemberType]
    OpenTelemetryConfigurator().configure()  # pyright: ignore[reportUnknownMemberType]
    _instrument_libraries()
    logs = env["OTEL_LOGS_EXPORTER"].strip().lower() != "none"
    if logs:
        _export_logs()
    _enabled = True
    logger.info(
        "telemetry exporting",
        extra={
            "endpoint": env["OTEL_EXPORTER_OTLP_ENDPOINT"],
            "protocol": env["OTEL_EXPORTER_OTLP_PROTOCOL"],
            "logs": logs,
        },
    )
    return True


def _export_logs() -> None:
    """Send every log record to the LoggerProvider the distro built (a batch processor in
    front of the OTLP log exporter of the chosen protocol)."""
    from opentelemetry._logs import get_logger_provider

    # The contrib instrumentations ship no stubs and no py.typed; their types are inferred.
    from opentelemetry.instrumentation.logging.handler import (  # pyright: ignore[reportMissingTypeStubs]
        LoggingHandler,
    )

    handler = LoggingHandler(logger_provider=get_logger_provider())
    handler.addFilter(_not_from_the_sdk)
    logging.getLogger().addHandler(handler)


def _not_from_the_sdk(record: logging.LogRecord) -> bool:
    # An exporter that cannot reach the collector logs a warning; exporting that warning
    # would fail the same way, one more record per batch, for as long as it is down.
    return not record.name.startswith("opentelemetry")


def _instrument_libraries() -> None:
    from connectrpc_otel import ConnectInstrumentor
    from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor

    ConnectInstrumentor().instrument()
    AioHttpClientInstrumentor().instrument()
    PsycopgInstrumentor().instrument(enable_commenter=False)


def observe(
    name: str,
    read: Callable[[], float],
    *,
    kind: str = "gauge",
    unit: str = "1",
    description: str = "",
) -> None:
    """Report `read()` as an observable gauge (or a monotonic counter) at each export.

    With telemetry off the meter is a no-op and `read` is never called.
    """
    meter = metrics.get_meter("microapp")
    create = meter.create_observable_counter if kind == "counter" else meter.create_observable_gauge
    create(name, callbacks=[_callback(read)], unit=unit, description=description)


def _callback(read: Callable[[], float]) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def callback(options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(read())]

    return callback


class TraceContextFilter(logging.Filter):
    """Adds `trace_id` and `span_id` to records written inside a recording span."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            record.trace_id = format(context.trace_id, "032x")
            record.span_id = format(context.span_id, "016x")
        return True
