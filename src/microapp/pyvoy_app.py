"""The ASGI app that Envoy's embedded Python imports under `microapp serve --server pyvoy`.

Envoy runs the app in an interpreter of its own, so the service is named by the
environment (`MICROAPP_SERVICE`, set by `microapp serve`) and built here at import, with
the same logging and telemetry set-up as under Hypercorn.
"""

from __future__ import annotations

import asyncio
import logging
import os

from microapp.serving import prepare_service, service_from_env


class _LateReceiveFilter(logging.Filter):
    """Drop pyvoy 1.3's "invalid state" callback error.

    When a handler stops waiting on `receive()` (connectrpc's gRPC path cancels its
    read once the request is complete), pyvoy later tries to complete the cancelled
    future and asyncio logs the failure at ERROR, once per call. Nothing is lost; the
    line would only teach operators to ignore errors.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (
            isinstance(exc, asyncio.InvalidStateError)
            and "RecvFutureExecutor" in record.getMessage()
        )


app = prepare_service(service_from_env(os.environ), dict(os.environ)).app
logging.getLogger("asyncio").addFilter(_LateReceiveFilter())
