"""Builds the greeter service: settings, caller client, database, ASGI app."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager

from pydantic import Field, field_validator
from starlette.applications import Starlette

from microapp.gen.caller.v1.caller_connect import CallerServiceClient
from microapp.gen.greeter.v1 import greeter_pb2
from microapp.gen.greeter.v1.greeter_connect import GreeterServiceASGIApplication
from microapp.gen.greeter.v2 import greeter_pb2 as greeter_v2_pb2
from microapp.gen.greeter.v2.greeter_connect import (
    GreeterServiceASGIApplication as GreeterV2ServiceASGIApplication,
)
from microapp.platform.clients import ServiceTransport
from microapp.platform.config import CommonSettings, Settings, variable
from microapp.platform.db import Database
from microapp.platform.http import ConnectService, ServiceParts, build_app
from microapp.platform.idempotency import IdempotentCall
from microapp.services.greeter.core import Caller, GreeterCore
from microapp.services.greeter.service import GreeterHandler
from microapp.services.greeter.service_v2 import GreeterV2Handler

# Its SQL migrations (migrations/*.sql) ship in the service's own package.
MIGRATIONS_PACKAGE = "microapp.services.greeter"

# Each Greet calls the caller and records a greeting: run once per Idempotency-Key.
IDEMPOTENT_CALLS = [
    IdempotentCall("/greeter.v1.GreeterService/Greet"),
    IdempotentCall("/greeter.v2.GreeterService/Greet"),
]
DEFAULT_EXTERNAL_API_URL = "https://example.com/"


class GreeterSettings(Settings):
    """greeter's own settings beside the common ones."""

    common: CommonSettings = Field(default_factory=CommonSettings)
    caller_base_url: str = variable("CALLER_BASE_URL", "http://127.0.0.1:8081")
    external_api_url: str = variable("EXTERNAL_API_URL", DEFAULT_EXTERNAL_API_URL)

    @field_validator("caller_base_url")
    @classmethod
    def _no_trailing_slash(cls, value: str) -> str:
        return value.rstrip("/")


def create_app(
    settings: GreeterSettings,
    *,
    caller: Caller | None = None,
    database: Database | None = None,
) -> Starlette:
    """The greeter service as an ASGI app.


    `database` is the one the platform opened from the registry (None without
    DATABASE_URL); `caller` defaults to a real client built from the settings, and
    benchmarks and tests may pass their own at this seam.
    """
    resources: list[AbstractAsyncContextManager[object]] = []
    if caller is None:
        transport = ServiceTransport(settings.caller_base_url)
        resources.append(transport)
        caller = CallerServiceClient(
            settings.caller_base_url, http_client=transport.client, send_compression=None
        )
    # v1 and v2 share one core: the same caller client, greetings table and error mapping.
    core = GreeterCore(caller, settings.external_api_url, database)
    return build_app(
        settings.common,
        ServiceParts(
            connect=[
                ConnectService(GreeterServiceASGIApplication, GreeterHandler(core)),
                ConnectService(GreeterV2ServiceASGIApplication, GreeterV2Handler(core)),
            ],
            proto_files=[greeter_pb2.DESCRIPTOR, greeter_v2_pb2.DESCRIPTOR],
            database=database,
            resources=resources,
            idempotent=IDEMPOTENT_CALLS,
        ),
    )
