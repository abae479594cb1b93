"""Builds the gateway service: settings, custom-lang client, breaker, retry budget, ASGI app."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.routing import Route

from microapp.gen.gateway.v1 import gateway_pb2
from microapp.gen.gateway.v1.gateway_connect import GatewayServiceASGIApplication
from microapp.platform.breaker import CircuitBreaker
from microapp.platform.coalesce import CoalesceSettings
from microapp.platform.config import CommonSettings, ConfigError, env_float, env_int, env_str
from microapp.platform.db import Database
from microapp.platform.http import ConnectService, Lifecycle, ServiceParts, build_app
from microapp.platform.idempotency import IdempotentCall
from microapp.platform.migrations import load_migrations
from microapp.platform.retry_budget import RetryBudget
from microapp.platform.telemetry import observe
from microapp.services.gateway.downstream import CustomLangClient
from microapp.services.gateway.service import (
    BreakerStatusRoute,
    CustomLang,
    GatewayHandler,
    ResilientInvoker,
)

MIGRATIONS_PACKAGE = "microapp.services.gateway"
DEFAULT_CUSTOM_LANG_BASE_URL = "http://127.0.0.1:3000"
# Each InvokeCustom calls custom-lang and records an invocation: run once per Idempotency-Key.
IDEMPOTENT_CALLS = [IdempotentCall("/gateway.v1.GatewayService/InvokeCustom")]


@dataclass(frozen=True)
class GatewaySettings:
    """gateway's own settings beside the common ones; defaults are the seed's numbers."""

    common: CommonSettings
    custom_lang_base_url: str = DEFAULT_CUSTOM_LANG_BASE_URL
    attempt_timeout_s: float = 1.0
    breaker_failures: int = 5
    breaker_interval_s: float = 10.0
    breaker_open_s: float = 30.0
    breaker_half_open_requests: int = 3
    retry_capacity: int = 20
    retry_refill_per_s: float = 10.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> GatewaySettings:
        """Read `CUSTOM_LANG_BASE_URL`, `GATEWAY_*` and the common variables."""
        env = os.environ if env is None else env
        base_url = env_str(env, "CUSTOM_LANG_BASE_URL", DEFAULT_CUSTOM_LANG_BASE_URL).rstrip("/")
        parts = urlsplit(base_url)
        if parts.scheme not in {"http", "https"} or not parts.netloc:
            raise ConfigError(f"CUSTOM_LANG_BASE_URL must be an http(s):// URL, got {base_url!r}")
        return cls(
            common=CommonSettings.from_env(
                "gateway", default_port=8082, default_otel_name="gateway-service", env=env
            ),
            custom_lang_base_url=base_url,
            attempt_timeout_s=env_float(env, "GATEWAY_ATTEMPT_TIMEOUT_S", 1.0, minimum=0.001),
            breaker_failures=env_int(env, "GATEWAY_BREAKER_FAILURES", 5, minimum=1),
            breaker_interval_s=env_float(env, "GATEWAY_BREAKER_INTERVAL_S", 10.0),
            breaker_open_s=env_float(env, "GATEWAY_BREAKER_OPEN_S", 30.0),
            breaker_half_open_requests=env_int(
                env, "GATEWAY_BREAKER_HALF_OPEN_REQUESTS", 3, minimum=1
            ),
            retry_capacity=env_int(env, "GATEWAY_RETRY_CAPACITY", 20),
            retry_refill_per_s=env_float(env, "GATEWAY_RETRY_REFILL_PER_S", 10.0),
        )


class ResilienceGauges:
    """Reports the breaker and the retry budget as OpenTelemetry gauges (when exporting).

    The callbacks run on the exporter's thread, so they read side-effect-free snapshots
    and never move the breaker or refill the bucket from there.
    """

    STATE_NUMBERS = {"closed": 0, "half_open": 1, "open": 2}

    def __init__(self, breaker: CircuitBreaker, budget: RetryBudget) -> None:
        self._breaker = breaker
        self._budget = budget

    async def start(self) -> None:
        breaker, budget = self._breaker, self._budget
        observe(
            "microapp.breaker.state",
            lambda: self.STATE_NUMBERS[breaker.snapshot().state],
            description="0 closed, 1 half-open, 2 open",
        )
        observe(
            "microapp.breaker.consecutive_failures",
            lambda: breaker.snapshot().consecutive_failures,
        )
        observe("microapp.retry_budget.tokens", lambda: budget.snapshot().whole_tokens)

    async def close(self) -> None:
        """Nothing to release."""


def create_app(
    settings: GatewaySettings,
    *,
    custom_lang: CustomLang | None = None,
    database: Database | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Starlette:
    """The gateway service as an ASGI app.

    `custom_lang`, `database` and `clock` default to real ones; tests and benchmarks
    may pass their own at this seam.
    """
    components: list[Lifecycle] = []
    if custom_lang is None:
        client = CustomLangClient(
            settings.custom_lang_base_url, timeout_s=settings.attempt_timeout_s
        )
        components.append(client)
        custom_lang = client
    if database is None and settings.common.database_url:
        database = Database(
            settings.common.database_url,
            load_migrations(MIGRATIONS_PACKAGE),
            coalesce=CoalesceSettings.from_env(),
        )
    breaker = CircuitBreaker(
        failure_threshold=settings.breaker_failures,
        interval_s=settings.breaker_interval_s,
        open_s=settings.breaker_open_s,
        half_open_max=settings.breaker_half_open_requests,
        clock=clock,
        name="custom-lang",
    )
    budget = RetryBudget(settings.retry_capacity, settings.retry_refill_per_s, clock=clock)
    components.append(ResilienceGauges(breaker, budget))
    handler = GatewayHandler(ResilientInvoker(custom_lang, breaker, budget), database)
    status = BreakerStatusRoute(breaker, budget)
    return build_app(
        settings.common,
        ServiceParts(
            connect=[ConnectService(GatewayServiceASGIApplication, handler)],
            proto_files=[gateway_pb2.DESCRIPTOR],
            routes=[Route("/debug/breaker", status.handle, methods=["GET"])],
            database=database,
            components=components,
            idempotent=IDEMPOTENT_CALLS,
        ),
    )
