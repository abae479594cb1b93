"""The service registry: each service's name, defaults, database and how to build it.

A new service is one package under `services/` plus one entry in `SERVICES`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar

from starlette.applications import Starlette

from microapp.platform.config import CommonSettings
from microapp.services.auth import app as auth
from microapp.services.caller import app as caller
from microapp.services.customlang import app as customlang
from microapp.services.gateway import app as gateway
from microapp.services.greeter import app as greeter
from microapp.services.web import app as web


@dataclass(frozen=True)
class BuiltService:
    """A service ready to serve: its common settings and its ASGI app."""

    settings: CommonSettings
    app: Starlette


Builder = Callable[[Mapping[str, str]], BuiltService]


@dataclass(frozen=True)
class ServiceSpec:
    """What the CLI, `microapp up` and the deployment files need to know of a service."""

    name: str
    default_port: int
    otel_service_name: str
    database: str | None
    migrations_package: str | None
    # Connect service paths it answers, e.g. "/greeter.v1.GreeterService".
    connect_paths: tuple[str, ...]
    build: Builder


class _Settings(Protocol):
    @property
    def common(self) -> CommonSettings: ...


S = TypeVar("S", bound=_Settings)


def _builder(
    from_env: Callable[[Mapping[str, str]], S], create: Callable[[S], Starlette]
) -> Builder:
    """Read a service's settings from the environment, then build its app from them."""

    def build(env: Mapping[str, str]) -> BuiltService:
        settings = from_env(env)
        return BuiltService(settings.common, create(settings))

    return build


SERVICES: dict[str, ServiceSpec] = {
    spec.name: spec
    for spec in (
        ServiceSpec(
            name="greeter",
            default_port=8080,
            otel_service_name="greeter-service",
            database="greeter_db",
            migrations_package=greeter.MIGRATIONS_PACKAGE,
            connect_paths=("/greeter.v1.GreeterService", "/greeter.v2.GreeterService"),
            build=_builder(greeter.GreeterSettings.from_env, greeter.create_app),
        ),
        ServiceSpec(
            name="caller",
            default_port=8081,
            otel_service_name="caller-service",
            database="caller_db",
            migrations_package=caller.MIGRATIONS_PACKAGE,
            connect_paths=("/caller.v1.CallerService",),
            build=_builder(caller.CallerSettings.from_env, caller.create_app),
        ),
        ServiceSpec(
            name="gateway",
            default_port=8082,
            otel_service_name="gateway-service",
            database="gateway_db",
            migrations_package=gateway.MIGRATIONS_PACKAGE,
            connect_paths=("/gateway.v1.GatewayService",),
            build=_builder(gateway.GatewaySettings.from_env, gateway.create_app),
        ),
        ServiceSpec(
            name="custom-lang",
            default_port=3000,
            otel_service_name="custom-lang-service",
            database="lang_db",
            migrations_package=customlang.MIGRATIONS_PACKAGE,
            connect_paths=("/customlang.v1.CustomLangService",),
            build=_builder(customlang.CustomLangSettings.from_env, customlang.create_app),
        ),
        ServiceSpec(
            name="auth",
            default_port=8090,
            otel_service_name="auth-service",
            database="auth_db",
            migrations_package=auth.MIGRATIONS_PACKAGE,
            connect_paths=("/auth.v1.AuthService",),
            build=_builder(auth.AuthSettings.from_env, auth.create_app),
        ),
        ServiceSpec(
            name="web",
            default_port=8000,
            otel_service_name="web",
            database=None,
            migrations_package=None,
            connect_paths=(),
            build=_builder(web.WebSettings.from_env, web.create_app),
        ),
    )
}
