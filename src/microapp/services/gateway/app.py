"""Builds the gateway service: settings, custom-lang client, breaker, retry budget, ASGI app."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from pydantic import Field, field_validator
from starlette.applications import Starlette
from starlette.routing import Route

from microapp.gen.gateway.v1 import gateway_pb2
from microapp.gen.gateway.v1.gateway_connect import GatewayServiceASGIApplication
from microapp.platform.breaker import CircuitBreaker
from microapp.platform.config import CommonSettings, Settings, http_url, variable
from microapp.platform.db import Database
from microapp.platform.http import ConnectService, ServiceParts, build_app
from microapp.platform.idempotency import IdempotentCall
from microapp.platform.retry_budget import RetryBudget
from microapp.platform.telemetry import observe
from microapp.services.gateway.downstream import CustomLangClient
from microapp.services.gateway.service import (
    BreakerStatusRoute,
    CustomLang,
    GatewayHandler,
    ResilientInvoker,
)

# Its SQL migrations (migrations/*.sql) ship in the service's own package.
MIGRATIONS_PACKAGE = "microapp.services.gateway"
DEFAULT_CUSTOM_LANG_BASE_URL = "http://127.0.0.1:3000"
# Each InvokeCustom calls custom-lang and records an invocation: run once per Idempotency-Key.
IDEMPOTENT_CALLS = [IdempotentCall("/gateway.v1.GatewayService/InvokeCustom")]


class GatewaySettings(Settings):
    """gateway's own settings beside the common ones; defaults are the seed's numbers."""

    common: CommonSettings = Field(default_factory=CommonSettings)
    custom_lang_base_url: str = variable("CUSTOM_LANG_BASE_URL", DEFAULT_CUSTOM_LANG_BASE_URL)
    attempt_timeout_s: float = variable("GATEWAY_ATTEMPT_TIMEOUT_S", 1.0, ge=0.001)
    breaker_failures: int = variable("GATEWAY_BREAKER_FAILURES", 5, ge=1)
    breaker_interval_s: float = variable("GATEWAY_BREAKER_INTERVAL_S", 10.0, ge=0.0)
    breaker_open_s: float = variable("GATEWAY_BREAKER_OPEN_S", 30.0, ge=0.0)
    breaker_half_open_requests: int = variable("GATEWAY_BREAKER_HALF_OPEN_REQUESTS", 3, ge=1)
    retry_capacity: int = variable("GATEWAY_RETRY_CAPACITY", 20, ge=0)
    retry_refill_per_s: float = variable("GATEWAY_RETRY_REFILL_PER_S", 10.0, ge=0.0)

    _url = field_validator("custom_lang_base_url")(http_url)


STATE_NUMBERS = {"closed": 0, "half_open": 1, "open": 2}


@asynccontextmanager
async def resilience_gauges(
    breaker: CircuitBreaker, budget: RetryBudget
) -> AsyncGenerator[None, None]:
    """Reports the breaker and the retry budget as OpenTelemetry gauges (when exporting),
    from startup on; there is nothing to release at shutdown.

    The callbacks run on the exporter's thread, so they read side-effect-free snapshots
    and never move the breaker or refill the bucket from there.
    """
    observe(
        "microapp.breaker.state",
        lambda: STATE_NUMBERS[breaker.snapshot().state],
        description="0 closed, 1 half-open, 2 open",
    )
    observe(
        "microapp.breaker.consecutive_failures",
        lambda: breaker.snapshot().consecutive_failures,
    )
    observe("microapp.retry_budget.tokens", lambda: budget.snapshot().whole_tokens)
    yield


def create_app(
    settings: GatewaySettings,
    *,
    custom_lang: CustomLang | None = None,
    database: Database | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Starlette:
    """The gateway service as an ASGI app.


    `database` is the platform's (None without DATABASE_URL); `custom_lang` and `clock`
    default to real ones; tests and benchmarks may pass their own at this seam.
    """
    resources: list[AbstractAsyncContextManager[object]] = []
    if custom_lang is None:
        client = CustomLangClient(
            settings.custom_lang_base_url, timeout_s=settings.attempt_timeout_s
        )
        resources.append(client)
        custom_lang = client
    breaker = CircuitBreaker(
        failure_threshold=settings.breaker_failures,
        interval_s=settings.breaker_interval_s,
        open_s=settings.breaker_open_s,
        half_open_max=settings.breaker_half_open_requests,
        clock=clock,
        name="custom-lang",
    )
    budget = RetryBudget(settings.retry_capacity, settings.retry_refill_per_s, clock=clock)
    resources.append(resilience_gauges(breaker, budget))
    handler = GatewayHandler(ResilientInvoker(custom_lang, breaker, budget), database)
    status = BreakerStatusRoute(breaker, budget)
    return build_app(
        settings.common,
        ServiceParts(
            connect=[ConnectService(GatewayServiceASGIApplication, handler)],
            proto_files=[gateway_pb2.DESCRIPTOR],
            routes=[Route("/debug/breaker", status.handle, methods=["GET"])],
            database=database,
            resources=resources,
            idempotent=IDEMPOTENT_CALLS,
        ),
    )
