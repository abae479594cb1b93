"""Builds the greeter service: settings, caller client, database, ASGI app."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from starlette.applications import Starlette

from microapp.gen.caller.v1.caller_connect import CallerServiceClient
from microapp.gen.greeter.v1 import greeter_pb2
from microapp.gen.greeter.v1.greeter_connect import GreeterServiceASGIApplication
from microapp.gen.greeter.v2 import greeter_pb2 as greeter_v2_pb2
from microapp.gen.greeter.v2.greeter_connect import (
    GreeterServiceASGIApplication as GreeterV2ServiceASGIApplication,
)
from microapp.platform.clients import ServiceTransport
from microapp.platform.coalesce import CoalesceSettings
from microapp.platform.config import CommonSettings, env_str
from microapp.platform.db import Database
from microapp.platform.http import ConnectService, Lifecycle, ServiceParts, build_app
from microapp.platform.idempotency import IdempotentCall
from microapp.platform.migrations import load_migrations
from microapp.services.greeter.core import Caller, GreeterCore
from microapp.services.greeter.service import GreeterHandler
from microapp.services.greeter.service_v2 import GreeterV2Handler

MIGRATIONS_PACKAGE = "microapp.services.greeter"
# Each Greet calls the caller and records a greeting: run once per Idempotency-Key.
IDEMPOTENT_CALLS = [
    IdempotentCall("/greeter.v1.GreeterService/Greet"),
    IdempotentCall("/greeter.v2.GreeterService/Greet"),
]
DEFAULT_EXTERNAL_API_URL = "https://example.com/"


@dataclass(frozen=True)
class GreeterSettings:
    """greeter's own settings beside the common ones."""

    common: CommonSettings
    caller_base_url: str = "http://127.0.0.1:8081"
    external_api_url: str = DEFAULT_EXTERNAL_API_URL

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> GreeterSettings:
        """Read `CALLER_BASE_URL`, `EXTERNAL_API_URL` and the common variables."""
        env = os.environ if env is None else env
        return cls(
            common=CommonSettings.from_env(
                "greeter", default_port=8080, default_otel_name="greeter-service", env=env
            ),
            caller_base_url=env_str(env, "CALLER_BASE_URL", "http://127.0.0.1:8081").rstrip("/"),
            external_api_url=env_str(env, "EXTERNAL_API_URL", DEFAULT_EXTERNAL_API_URL),
        )


def create_app(
    settings: GreeterSettings,
    *,
    caller: Caller | None = None,
    database: Database | None = None,
) -> Starlette:
    """The greeter service as an ASGI app.

    `caller` and `database` default to real ones built from the settings; benchmarks
    and tests may pass their own at this seam.
    """
    components: list[Lifecycle] = []
    if caller is None:
        transport = ServiceTransport(settings.caller_base_url)
        components.append(transport)
        caller = CallerServiceClient(
            settings.caller_base_url, http_client=transport.client, send_compression=None
        )
    if database is None and settings.common.database_url:
        database = Database(
            settings.common.database_url,
            load_migrations(MIGRATIONS_PACKAGE),
            coalesce=CoalesceSettings.from_env(),
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
            components=components,
            idempotent=IDEMPOTENT_CALLS,
        ),
    )
