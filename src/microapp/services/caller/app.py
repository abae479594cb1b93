"""Builds the caller service: settings, fetcher, write-behind call log, ASGI app."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from starlette.applications import Starlette

from microapp.gen.caller.v1 import caller_pb2
from microapp.gen.caller.v1.caller_connect import CallerServiceASGIApplication
from microapp.platform.config import CommonSettings, env_bool, env_float, env_int, env_list
from microapp.platform.db import Database
from microapp.platform.http import ConnectService, ServiceParts, build_app
from microapp.platform.migrations import load_migrations
from microapp.platform.writebehind import WriteBehindQueue
from microapp.services.caller.addresses import AddressRule, non_public_rule
from microapp.services.caller.fetch import ExternalFetcher, FetchLimits
from microapp.services.caller.guard import TargetGuard
from microapp.services.caller.service import INSERT_CALL_LOG, CallerHandler

MIGRATIONS_PACKAGE = "microapp.services.caller"


@dataclass(frozen=True)
class CallerSettings:
    """caller's own settings beside the common ones."""

    common: CommonSettings
    allowed_hosts: tuple[str, ...] = ()
    allow_private_networks: bool = False
    external_timeout_s: float = 3.0
    max_body_bytes: int = 10 * 1024 * 1024
    max_connections: int = 100
    max_connections_per_host: int = 10
    write_queue_capacity: int = 10_000
    write_drain_timeout_s: float = 10.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> CallerSettings:
        """Read `CALLER_*` and the common variables."""
        env = os.environ if env is None else env
        return cls(
            common=CommonSettings.from_env(
                "caller", default_port=8081, default_otel_name="caller-service", env=env
            ),
            allowed_hosts=env_list(env, "CALLER_ALLOWED_HOSTS"),
            allow_private_networks=env_bool(env, "CALLER_ALLOW_PRIVATE_NETWORKS", False),
            external_timeout_s=env_float(env, "CALLER_EXTERNAL_TIMEOUT_S", 3.0, minimum=0.001),
            max_body_bytes=env_int(env, "CALLER_MAX_BODY_BYTES", 10 * 1024 * 1024, minimum=1),
            max_connections=env_int(env, "CALLER_MAX_CONNECTIONS", 100, minimum=1),
            max_connections_per_host=env_int(env, "CALLER_MAX_CONNECTIONS_PER_HOST", 10, minimum=1),
            write_queue_capacity=env_int(env, "CALLER_WRITE_QUEUE_CAPACITY", 10_000, minimum=1),
            write_drain_timeout_s=env_float(env, "CALLER_WRITE_DRAIN_TIMEOUT_S", 10.0),
        )


def target_guard(settings: CallerSettings, address_rule: AddressRule) -> TargetGuard:
    """The rules every hop passes: the allowlist, and the address rule unless lifted."""
    rule = None if settings.allow_private_networks else address_rule
    return TargetGuard.of(rule, settings.allowed_hosts)


def fetch_limits(settings: CallerSettings) -> FetchLimits:
    """The fetcher's bounds, from the settings."""
    return FetchLimits(
        timeout_s=settings.external_timeout_s,
        max_body_bytes=settings.max_body_bytes,
        max_connections=settings.max_connections,
        max_connections_per_host=settings.max_connections_per_host,
    )


def create_app(
    settings: CallerSettings, *, address_rule: AddressRule = non_public_rule
) -> Starlette:
    """The caller service as an ASGI app; resources open at startup, close at shutdown.

    `address_rule` decides which addresses are refused unless private networks are allowed.
    """
    fetcher = ExternalFetcher(target_guard(settings, address_rule), fetch_limits(settings))
    database = None
    call_log = None
    if settings.common.database_url:
        database = Database(settings.common.database_url, load_migrations(MIGRATIONS_PACKAGE))
        call_log = WriteBehindQueue(
            database,
            INSERT_CALL_LOG,
            capacity=settings.write_queue_capacity,
            drain_timeout=settings.write_drain_timeout_s,
        )
    handler = CallerHandler(fetcher, call_log)
    return build_app(
        settings.common,
        ServiceParts(
            connect=[ConnectService(CallerServiceASGIApplication, handler)],
            proto_files=[caller_pb2.DESCRIPTOR],
            database=database,
            components=[fetcher, *([call_log] if call_log else [])],
        ),
    )
