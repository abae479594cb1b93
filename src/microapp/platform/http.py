"""The Starlette app every service is served as: Connect mounts, health, CORS, reflection."""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, replace
from typing import Any, Generic, Protocol, TypeVar, cast
from urllib.parse import quote

from connectrpc.code import Code
from connectrpc.interceptor import (
    BidiStreamInterceptor,
    ClientStreamInterceptor,
    MetadataInterceptor,
    ServerStreamInterceptor,
    UnaryInterceptor,
)
from connectrpc.server import ConnectASGIApplication
from google.protobuf.descriptor import FileDescriptor
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from microapp.platform.accesslog import AccessLog, AccessLogInterceptor
from microapp.platform.authn import token_check
from microapp.platform.config import CommonSettings
from microapp.platform.db import Database
from microapp.platform.idempotency import (
    IdempotencyInterceptor,
    IdempotencySettings,
    IdempotentCall,
    IdempotentRoutes,
    idempotency_for,
)
from microapp.platform.reflection import reflection_apps
from microapp.platform.rest import (
    InternalErrorsAsJson,
    http_exception_handler,
    internal_error_handler,
)
from microapp.platform.telemetry import telemetry_enabled
from microapp.platform.validation import GenericInternalErrors, RejectNulText

logger = logging.getLogger(__name__)

CORS_ALLOW_HEADERS = [
    "Content-Type",
    "Authorization",
    "Connect-Protocol-Version",
    "Connect-Timeout-Ms",
    "Grpc-Timeout",
    "X-Grpc-Web",
    "X-User-Agent",
    "Idempotency-Key",
]
CORS_EXPOSE_HEADERS = ["Grpc-Status", "Grpc-Message", "Grpc-Status-Details-Bin"]


# connectrpc's own `Interceptor` union leaves MetadataInterceptor's type parameter open.
Interceptor = (
    UnaryInterceptor
    | ClientStreamInterceptor
    | ServerStreamInterceptor
    | BidiStreamInterceptor
    | MetadataInterceptor[Any]
)

# The generated service protocol an implementation subclasses (`GreeterService`, ...).
_Service = TypeVar("_Service")


class ConnectAppFactory(Protocol[_Service]):
    """The generated `XServiceASGIApplication` class, called the way `build_app` calls it."""

    def __call__(
        self,
        service: _Service,
        *,
        interceptors: Iterable[Interceptor] = ...,
        read_max_bytes: int | None = ...,
    ) -> ConnectASGIApplication[_Service]: ...


@dataclass(frozen=True)
class ConnectService(Generic[_Service]):
    """One Connect service: its generated ASGI application class and our implementation.

    Generic, so `ConnectService(GreeterServiceASGIApplication, handler)` is checked: the
    handler must be a `GreeterService`.
    """

    app_class: ConnectAppFactory[_Service]
    implementation: _Service


@dataclass
class ServiceParts:
    """Everything that makes one service, handed to `build_app`."""

    # Any: each entry was checked against its own protocol where it was built.
    connect: Sequence[ConnectService[Any]]
    proto_files: Sequence[FileDescriptor]
    routes: Sequence[BaseRoute] = ()
    database: Database | None = None
    # Async context managers entered in order after the database (at startup), left in
    # reverse before it (at shutdown): clients, queues, pools.
    resources: Sequence[AbstractAsyncContextManager[object]] = ()
    interceptors: Sequence[Interceptor] = field(default_factory=list[Interceptor])
    # Connect procedures and REST routes that honour `Idempotency-Key`.
    idempotent: Sequence[IdempotentCall] = ()
    # None: the service's (CommonSettings.idempotency).
    idempotency_settings: IdempotencySettings | None = None


def build_app(settings: CommonSettings, parts: ServiceParts) -> Starlette:
    """Compose one service's ASGI app."""
    if settings.auth_required:
        check = token_check(settings)
        # Health routes are added below, outside `parts.routes`, so they stay open.
        parts = replace(
            parts,
            interceptors=[check.interceptor, *parts.interceptors],
            routes=check.guard(parts.routes),
            resources=[check.keys, *parts.resources],
        )
    # First, so every unexpected error leaves as a generic `internal`; last, NUL text is
    # refused before any handler (and its database) sees it.
    parts = replace(
        parts, interceptors=[GenericInternalErrors(), *parts.interceptors, RejectNulText()]
    )
    idempotency = None
    if parts.idempotent:
        # Last of the interceptors: calls refused by a token check or validation claim no key.
        idempotency = idempotency_for(
            parts.database, parts.idempotency_settings or settings.idempotency
        )
        parts = replace(
            parts,
            interceptors=[
                *parts.interceptors,
                IdempotencyInterceptor(idempotency, parts.idempotent),
            ],
            resources=[*parts.resources, idempotency],
        )
    access_log = settings.access_log
    # First of ours, so it sees every call's outcome, even one a token check refuses.
    interceptors = (
        [AccessLogInterceptor(), *parts.interceptors] if access_log else parts.interceptors
    )
    mounts: list[BaseRoute] = []
    connect_apps: dict[str, ASGIApp] = {}
    for service in parts.connect:
        app = service.app_class(
            service.implementation,
            interceptors=list(interceptors),
            read_max_bytes=settings.max_body_bytes,
        )
        connect_apps[app.path] = _grpc_needs_trailers(_asgi(app))
        mounts.append(Mount(app.path, app=connect_apps[app.path]))
    for reflection in reflection_apps(parts.proto_files):
        mounts.append(Mount(reflection.path, app=_asgi(reflection)))

    async def healthz(request: Request) -> PlainTextResponse:
        if parts.database is None or await parts.database.healthy():
            return PlainTextResponse("ok")
        return PlainTextResponse("database unavailable", status_code=503)

    async def livez(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    middleware: list[Middleware] = []
    if telemetry_enabled():
        middleware.append(_rest_tracing(mounts))
    rpc_prefixes = [m.path for m in mounts if isinstance(m, Mount)]
    # Connect calls skip Starlette (see `_ServiceApp`) but pass the same middleware as the
    # routes, minus REST tracing (which excludes them) and IdempotentRoutes (REST only).
    rpc_middleware: list[Middleware] = []
    if access_log:
        # Inside the REST tracing middleware, so REST lines carry its span's ids.
        middleware.append(Middleware(AccessLog, rpc_prefixes=rpc_prefixes))
        rpc_middleware.append(Middleware(AccessLog, rpc_prefixes=rpc_prefixes))
    if settings.cors_allowed_origins:
        cors = Middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_allowed_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=CORS_ALLOW_HEADERS,
            expose_headers=CORS_EXPOSE_HEADERS,
            max_age=7200,
        )
        middleware.append(cors)
        rpc_middleware.append(cors)
    rpc_middleware.append(Middleware(InternalErrorsAsJson))
    # Innermost, so tracing, logging and CORS see a 500 answer rather than an exception.
    if idempotency is not None:
        middleware.append(
            Middleware(
                IdempotentRoutes,
                idempotency=idempotency,
                calls=parts.idempotent,
                max_body_bytes=settings.max_body_bytes,
            )
        )
    middleware.append(Middleware(InternalErrorsAsJson))

    return _ServiceApp(
        rpc={path: _wrap(app, rpc_middleware) for path, app in connect_apps.items()},
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/livez", livez, methods=["GET"]),
            *parts.routes,
            *mounts,
        ],
        middleware=middleware,
        exception_handlers={
            HTTPException: http_exception_handler,
            Exception: internal_error_handler,
        },
        lifespan=_lifespan(settings, parts),
    )


class _ServiceApp(Starlette):
    """Starlette, with Connect calls taken before its middleware stack and router.

    A Connect path is `/{service}/{method}`: one dict lookup of its service finds the
    Connect app (wrapped in the middleware given in `rpc`), where Starlette would pass
    the call through every middleware layer and match it against each route's pattern
    in turn. Every other request (REST, health, reflection, an odd path) is Starlette's,
    as before; a Connect app answers a method it does not have with 404 either way.
    """

    def __init__(self, *, rpc: dict[str, ASGIApp], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._rpc = rpc

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            app = self._rpc.get(scope["path"].rpartition("/")[0])
            if app is not None:
                scope["app"] = self
                await app(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def _asgi(app: object) -> ASGIApp:
    """A Connect application as Starlette's `ASGIApp`. connectrpc types its `__call__` with
    asgiref's TypedDict scopes and events, Starlette with plain mappings: the same ASGI
    protocol in two spellings that a type checker cannot relate, hence the cast."""
    return cast(ASGIApp, app)


def _wrap(app: ASGIApp, middleware: Sequence[Middleware]) -> ASGIApp:
    """`app` inside `middleware`, the first listed outermost (as Starlette orders it)."""
    for cls, args, kwargs in reversed(middleware):
        app = cls(app, *args, **kwargs)
    return app


def _grpc_needs_trailers(app: ASGIApp) -> ASGIApp:
    """Answer, in the protocol in use, what the Connect app cannot.

    gRPC (not gRPC-Web) carries its status in HTTP trailers, which Hypercorn offers on
    HTTP/2 only (and Granian not at all): without them answer `unimplemented` in the
    headers (a trailers-only response) instead of letting the Connect app raise and log a
    traceback per request. And connectrpc decodes every header (and a GET's query) as
    UTF-8 before any interceptor runs: one that is not would come back as `unknown` with
    Python's codec error, so it is `invalid_argument` here.
    """

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            content_type = Headers(scope=scope).get("content-type", "")
            grpc = content_type.startswith("application/grpc")
            if not _utf8_request(scope):
                message = "request headers and query must be UTF-8"
                await _refuse(send, content_type, Code.INVALID_ARGUMENT, message)
                return
            if (
                grpc
                and not content_type.startswith("application/grpc-web")
                and "http.response.trailers" not in scope.get("extensions", {})
            ):
                message = "gRPC needs HTTP/2 trailers, not offered here; use Connect or gRPC-Web"
                await _refuse(send, content_type, Code.UNIMPLEMENTED, message)
                return
        await app(scope, receive, send)

    return guarded


def _utf8_request(scope: Scope) -> bool:
    """True when every header name and value, and the query string, decode as UTF-8."""
    for name, value in scope["headers"]:
        if not (name.isascii() and value.isascii()):
            try:
                name.decode()
                value.decode()
            except UnicodeDecodeError:
                return False
    query: bytes = scope.get("query_string", b"")
    if query.isascii():
        return True
    try:
        query.decode()
    except UnicodeDecodeError:
        return False
    return True


async def _refuse(send: Send, content_type: str, code: Code, message: str) -> None:
    """An error answered before the Connect app runs: trailers-only for gRPC and
    gRPC-Web, Connect's JSON error body otherwise."""
    if content_type.startswith("application/grpc"):
        status, body = 200, b""
        headers = [
            (b"content-type", content_type.encode("latin-1")),
            (b"grpc-status", str(_GRPC_STATUS[code]).encode()),
            (b"grpc-message", quote(message).encode()),
        ]
    else:
        status = _CONNECT_HTTP_STATUS[code]
        body = json.dumps({"code": code.name.lower(), "message": message}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# The codes `_refuse` answers, as gRPC status numbers and Connect's HTTP statuses.
_GRPC_STATUS = {Code.INVALID_ARGUMENT: 3, Code.UNIMPLEMENTED: 12}
_CONNECT_HTTP_STATUS = {Code.INVALID_ARGUMENT: 400, Code.UNIMPLEMENTED: 501}


def _rest_tracing(mounts: Sequence[BaseRoute]) -> Middleware:
    """HTTP server spans for the REST routes; Connect calls get RPC spans from connectrpc-otel
    instead, and health probes none at all."""
    # The contrib instrumentations ship no stubs and no py.typed; their types are inferred.
    from opentelemetry.instrumentation.asgi import (  # pyright: ignore[reportMissingTypeStubs]
        OpenTelemetryMiddleware,
    )

    excluded = ["/healthz", "/livez", *(re.escape(m.path) for m in mounts if isinstance(m, Mount))]
    return Middleware(OpenTelemetryMiddleware, excluded_urls=",".join(excluded))


def _lifespan(settings: CommonSettings, parts: ServiceParts) -> Callable[[Starlette], Any]:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncGenerator[None, None]:
        async with contextlib.AsyncExitStack() as stack:
            if parts.database is not None:
                await stack.enter_async_context(parts.database)
            else:
                logger.info("running without a database (DATABASE_URL is not set)")
            for resource in parts.resources:
                await stack.enter_async_context(resource)
            logger.info("service started", extra={"port": settings.port})
            yield
            logger.info("service stopping")

    return lifespan
