"""Structured logging: one JSON object per line, with the service name on every record."""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

from microapp.platform.telemetry import TraceContextFilter


def configure_logging(service: str, *, level: str = "INFO") -> None:
    """Send every log record to stderr as a JSON line carrying `service`.

    Extra fields passed with `logger.info(..., extra={...})` become keys of the object;
    records written inside a span carry its `trace_id` and `span_id`.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(TraceContextFilter())
    handler.setFormatter(
        JsonFormatter(
            "{asctime}{levelname}{name}{message}",
            style="{",
            rename_fields={"asctime": "timestamp", "levelname": "level", "name": "logger"},
            static_fields={"service": service},
            datefmt="%Y-%m-%dT%H:%M:%S%z",
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Hypercorn's access log would print a line per request; errors still come through.
    logging.getLogger("hypercorn.access").setLevel(logging.WARNING)
    logging.getLogger("psycopg.pool").setLevel(logging.WARNING)
