"""One JSON access line per request: what was called, how, with what outcome, how long.

A pure ASGI middleware (`AccessLog`) times the request and reads the HTTP status (and, for
gRPC, `grpc-status` from the response headers or trailers). Connect calls also pass through
`AccessLogInterceptor`, which runs inside the RPC span connectrpc-otel opens, so it can hand
the middleware that span's context and the call's Connect code: the line is then written
under the span, and carries the same `trace_id` and `span_id` as the span the OTLP
collector receives. Health probes write nothing.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from contextvars import ContextVar
from typing import Any

from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from opentelemetry import context as otel_context
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("microapp.access")

# Codes that say the server (or something behind it) failed, not the caller: these lines
# are warnings, like 5xx statuses. deadline_exceeded is the caller's budget running out
# and stays INFO, as every 4xx-like code does.
SERVER_FAULT_CODES = frozenset({"internal", "unknown", "data_loss", "unavailable"})
QUIET_PATHS = frozenset({"/healthz", "/livez"})

# gRPC status numbers → Connect code names (the gRPC and Connect codes are one table).
_GRPC_CODES = (
    "ok", "canceled", "unknown", "invalid_argument", "deadline_exceeded", "not_found",
    "already_exists", "permission_denied", "resource_exhausted", "failed_precondition",
    "aborted", "out_of_range", "unimplemented", "internal", "unavailable", "data_loss",
    "unauthenticated",
)  # fmt: skip
# A Connect error body is small JSON; read at most this much of it for its code.
_ERROR_BODY_LIMIT = 4096


class _Call:
    """What one request's line needs, filled in as the request goes."""

    __slots__ = ("code", "context", "error_body", "status")

    def __init__(self) -> None:
        self.code: str | None = None
        self.context: otel_context.Context | None = None
        self.status = 0
        self.error_body = b""


_current_call: ContextVar[_Call | None] = ContextVar("microapp_access_call", default=None)


class AccessLogInterceptor:
    """A Connect metadata interceptor that tells `AccessLog` the call's span and code.

    Listed after connectrpc-otel's interceptor, its `on_start` runs inside the RPC span.
    """

    async def on_start(self, ctx: RequestContext[Any, Any]) -> _Call | None:
        call = _current_call.get()
        if call is not None:
            call.context = otel_context.get_current()
        return call

    async def on_end(
        self, call: _Call | None, ctx: RequestContext[Any, Any], error: Exception | None
    ) -> None:
        if call is not None:
            if error is None:
                call.code = "ok"
            elif isinstance(error, ConnectError):
                call.code = error.code.value
            else:
                call.code = "unknown"


class AccessLog:
    """ASGI middleware writing one `microapp.access` line per HTTP request.

    `rpc_prefixes` are the Connect mount paths (`/greeter.v1.GreeterService`, ...):
    requests under them are logged as RPCs with protocol, codec and code; the rest as
    routes with their HTTP status.
    """

    def __init__(self, app: ASGIApp, rpc_prefixes: Sequence[str] = ()) -> None:
        self.app = app
        self.rpc_prefixes = tuple(f"{p.rstrip('/')}/" for p in rpc_prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # With even warnings off no line can be written: nothing to time or watch.
        if (
            scope["type"] != "http"
            or scope["path"] in QUIET_PATHS
            or not logger.isEnabledFor(logging.WARNING)
        ):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path: str = scope["path"]
        rpc = bool(self.rpc_prefixes) and path.startswith(self.rpc_prefixes)
        content_type = _content_type(scope) if rpc else ""
        grpc = content_type.startswith("application/grpc")
        call = _Call()
        token = _current_call.set(call)

        async def watch(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                call.status = message["status"]
                if grpc:
                    _read_grpc_status(call, message["headers"])
            elif kind == "http.response.trailers":
                if grpc:
                    _read_grpc_status(call, message["headers"])
            elif (
                rpc
                and not grpc
                and call.status >= 400
                and call.code is None
                and len(call.error_body) < _ERROR_BODY_LIMIT
            ):
                call.error_body += message.get("body", b"")[:_ERROR_BODY_LIMIT]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except BaseException:
            if not call.status:
                call.status = 500
            raise
        finally:
            _current_call.reset(token)
            _write(scope, call, rpc, content_type, started)


def _content_type(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"content-type":
            return value.decode("latin-1")
    return ""


def _read_grpc_status(call: _Call, headers: Sequence[tuple[bytes, bytes]]) -> None:
    for name, value in headers:
        if name == b"grpc-status":
            number = int(value) if value.isdigit() else 2
            call.code = _GRPC_CODES[number] if number < len(_GRPC_CODES) else "unknown"


def _protocol_and_codec(scope: Scope, content_type: str) -> tuple[str, str]:
    if content_type.startswith("application/grpc-web"):
        protocol = "grpc-web"
    elif content_type.startswith("application/grpc"):
        protocol = "grpc"
    else:
        protocol = "connect"
    if scope["method"] == "GET":  # a Connect GET names its codec in the query
        codec = "proto" if b"encoding=proto" in scope["query_string"] else "json"
    else:
        codec = "json" if "json" in content_type else "proto"
    return protocol, codec


def _connect_error_code(body: bytes) -> str | None:
    """The code of a Connect unary error body, for errors raised before any interceptor."""
    try:
        code = json.loads(body).get("code")
    except (ValueError, AttributeError):
        return None
    return code if isinstance(code, str) else None


def _write(scope: Scope, call: _Call, rpc: bool, content_type: str, started: float) -> None:
    status = call.status
    if rpc and call.code is None and call.error_body:
        call.code = _connect_error_code(call.error_body)
    server_fault = status >= 500 or call.code in SERVER_FAULT_CODES
    level = logging.WARNING if server_fault else logging.INFO
    if not logger.isEnabledFor(level):
        return
    client = scope.get("client")
    fields: dict[str, object] = {
        "method": scope["method"],
        "http_version": scope["http_version"],
        "status": status,
        "duration_ms": round((time.perf_counter() - started) * 1000, 3),
    }
    if client:  # absent for some transports (a Unix socket, an in-process test client)
        fields["peer"] = f"{client[0]}:{client[1]}"
    if rpc:
        fields["procedure"] = scope["path"]
        fields["protocol"], fields["codec"] = _protocol_and_codec(scope, content_type)
        fields["code"] = call.code
        message = f"{scope['path']} {call.code}"
    else:
        fields["route"] = scope["path"]
        message = f"{scope['method']} {scope['path']} {status}"
    if call.context is None:
        _emit(level, message, fields)
        return
    # Connect calls: write under the RPC span, so the line (and its OTLP record)
    # carries that span's trace and span ids.
    token = otel_context.attach(call.context)
    try:
        _emit(level, message, fields)
    finally:
        otel_context.detach(token)


def _emit(level: int, message: str, fields: dict[str, object]) -> None:
    # As logger.log would, minus the search of the caller's frame for a file and line
    # that the line never shows: deep in an ASGI stack it is half the cost of the line.
    logger.handle(logger.makeRecord(logger.name, level, "", 0, message, (), None, extra=fields))
