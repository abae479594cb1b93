"""The service registry: each service's name, defaults, database and how to build it.

A new service is one package under `services/` plus one entry in `SERVICES`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from starlette.applications import Starlette

from microapp.platform.config import CommonSettings
from microapp.services.auth.app import MIGRATIONS_PACKAGE as AUTH_MIGRATIONS
from microapp.services.auth.app import AuthSettings
from microapp.services.auth.app import create_app as create_auth
from microapp.services.caller.app import MIGRATIONS_PACKAGE as CALLER_MIGRATIONS
from microapp.services.caller.app import CallerSettings
from microapp.services.caller.app import create_app as create_caller
from microapp.services.customlang.app import MIGRATIONS_PACKAGE as CUSTOMLANG_MIGRATIONS
from microapp.services.customlang.app import CustomLangSettings
from microapp.services.customlang.app import create_app as create_customlang
from microapp.services.gateway.app import MIGRATIONS_PACKAGE as GATEWAY_MIGRATIONS
from microapp.services.gateway.app import GatewaySettings
from microapp.services.gateway.app import create_app as create_gateway
from microapp.services.greeter.app import MIGRATIONS_PACKAGE as GREETER_MIGRATIONS
from microapp.services.greeter.app import GreeterSettings
from microapp.services.greeter.app import create_app as create_greeter
from microapp.services.web.app import WebSettings
from microapp.services.web.app import create_app as create_web


@dataclass(frozen=True)
class BuiltService:
    """A service ready to serve: its common settings and its ASGI app."""

    settings: CommonSettings
    app: Starlette


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
    build: Callable[[Mapping[str, str]], BuiltService]


def _build_greeter(env: Mapping[str, str]) -> BuiltService:
    settings = GreeterSettings.from_env(env)
    return BuiltService(settings.common, create_greeter(settings))


def _build_caller(env: Mapping[str, str]) -> BuiltService:
    settings = CallerSettings.from_env(env)
    return BuiltService(settings.common, create_caller(settings))


def _build_gateway(env: Mapping[str, str]) -> BuiltService:
    settings = GatewaySettings.from_env(env)
    return BuiltService(settings.common, create_gateway(settings))


def _build_customlang(env: Mapping[str, str]) -> BuiltService:
    settings = CustomLangSettings.from_env(env)
    return BuiltService(settings.common, create_customlang(settings))


def _build_web(env: Mapping[str, str]) -> BuiltService:
    settings = WebSettings.from_env(env)
    return BuiltService(settings.common, create_web(settings))


def _build_auth(env: Mapping[str, str]) -> BuiltService:
    settings = AuthSettings.from_env(env)
    return BuiltService(settings.common, create_auth(settings))


SERVICES: dict[str, ServiceSpec] = {
    spec.name: spec
    for spec in (
        ServiceSpec(
            name="greeter",
            default_port=8080,
            otel_service_name="greeter-service",
            database="greeter_db",
            migrations_package=GREETER_MIGRATIONS,
            connect_paths=("/greeter.v1.GreeterService",),
            build=_build_greeter,
        ),
        ServiceSpec(
            name="caller",
            default_port=8081,
            otel_service_name="caller-service",
            database="caller_db",
            migrations_package=CALLER_MIGRATIONS,
            connect_paths=("/caller.v1.CallerService",),
            build=_build_caller,
        ),
        ServiceSpec(
            name="gateway",
            default_port=8082,
            otel_service_name="gateway-service",
            database="gateway_db",
            migrations_package=GATEWAY_MIGRATIONS,
            connect_paths=("/gateway.v1.GatewayService",),
            build=_build_gateway,
        ),
        ServiceSpec(
            name="custom-lang",
            default_port=3000,
            otel_service_name="custom-lang-service",
            database="lang_db",
            migrations_package=CUSTOMLANG_MIGRATIONS,
            connect_paths=("/customlang.v1.CustomLangService",),
            build=_build_customlang,
        ),
        ServiceSpec(
            name="auth",
            default_port=8090,
            otel_service_name="auth-service",
            database="auth_db",
            migrations_package=AUTH_MIGRATIONS,
            connect_paths=("/auth.v1.AuthService",),
            build=_build_auth,
        ),
        ServiceSpec(
            name="web",
            default_port=8000,
            otel_service_name="web",
            database=None,
            migrations_package=None,
            connect_paths=(),
            build=_build_web,
        ),
    )
}
