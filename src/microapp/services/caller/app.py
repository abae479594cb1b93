"""Builds the caller service: settings, fetcher, write-behind call log, ASGI app."""

from __future__ import annotations

from pydantic import Field, field_validator
from starlette.applications import Starlette

from microapp.gen.caller.v1 import caller_pb2
from microapp.gen.caller.v1.caller_connect import CallerServiceASGIApplication
from microapp.platform.config import CommaList, CommonSettings, Settings, split_list, variable
from microapp.platform.db import Database
from microapp.platform.http import ConnectService, ServiceParts, build_app
from microapp.platform.writebehind import WriteBehindQueue
from microapp.services.caller.addresses import AddressRule, non_public_rule
from microapp.services.caller.fetch import ExternalFetcher, FetchLimits
from microapp.services.caller.guard import TargetGuard
from microapp.services.caller.service import INSERT_CALL_LOG, CallerHandler

# Its SQL migrations (migrations/*.sql) ship in the service's own package.
MIGRATIONS_PACKAGE = "microapp.services.caller"


class CallerSettings(Settings):
    """caller's own settings beside the common ones."""

    common: CommonSettings = Field(default_factory=CommonSettings)
    allowed_hosts: CommaList = variable("CALLER_ALLOWED_HOSTS", ())
    allow_private_networks: bool = variable("CALLER_ALLOW_PRIVATE_NETWORKS", False)
    external_timeout_s: float = variable("CALLER_EXTERNAL_TIMEOUT_S", 3.0, ge=0.001)
    max_body_bytes: int = variable("CALLER_MAX_BODY_BYTES", 10 * 1024 * 1024, ge=1)
    max_connections: int = variable("CALLER_MAX_CONNECTIONS", 100, ge=1)
    max_connections_per_host: int = variable("CALLER_MAX_CONNECTIONS_PER_HOST", 10, ge=1)
    write_queue_capacity: int = variable("CALLER_WRITE_QUEUE_CAPACITY", 10_000, ge=1)
    write_drain_timeout_s: float = variable("CALLER_WRITE_DRAIN_TIMEOUT_S", 10.0, ge=0.0)

    _split = field_validator("allowed_hosts", mode="before")(split_list)


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
    settings: CallerSettings,
    *,
    database: Database | None = None,
    address_rule: AddressRule = non_public_rule,
) -> Starlette:
    """The caller service as an ASGI app; resources open at startup, close at shutdown.


    `database` is the platform's (None without DATABASE_URL); `address_rule` decides
    which addresses are refused unless private networks are allowed.
    """
    fetcher = ExternalFetcher(target_guard(settings, address_rule), fetch_limits(settings))
    call_log = None
    if database is not None:
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
            resources=[fetcher, *([call_log] if call_log else [])],
        ),
    )
