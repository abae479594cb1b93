"""The service registry: each service's name, port, database, whom it calls and how to build it.

A new service is one package under `services/` plus one entry in `SERVICES`. Everything
else (`microapp serve|migrate|up`, the deployment checks, the fuzz tests) reads it here.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.applications import Starlette

from microapp.platform.config import CommonSettings, Settings, env_names
from microapp.platform.db import Database
from microapp.platform.migrations import load_migrations
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


class AppFactory(Protocol):
    """A service's `create_app`: its settings model and the platform's database in, app out."""

    def __call__(self, settings: Any, /, *, database: Database | None) -> Starlette: ...


@dataclass(frozen=True)
class Call:
    """One service calling another: the variable that carries the callee's URL.

    `path` is appended to the callee's base URL (`/.well-known/jwks.json`). `browser`
    calls are made by the page a service serves, not by the service; `proxied` calls are
    only needed where the browser cannot reach the callee itself (behind Traefik), so
    `microapp up`, where it can, leaves them unset.
    """

    service: str
    variable: str
    path: str = ""
    browser: bool = False
    proxied: bool = False


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
    # Its settings model (a `Settings` with a `common: CommonSettings` field).
    settings: type[Settings]
    create_app: AppFactory
    calls: tuple[Call, ...] = ()

    def read_settings(self, env: Mapping[str, str]) -> Any:
        """The service's settings from `env`, with its registry port and OTel name as the
        defaults of PORT and OTEL_SERVICE_NAME. Raises `ConfigError`."""
        defaults = {"PORT": str(self.default_port), "OTEL_SERVICE_NAME": self.otel_service_name}
        source = {**defaults, **{k: v for k, v in env.items() if v.strip()}}
        common = CommonSettings.from_env(source, service=self.name)
        return self.settings.from_env(source, common=common)

    def open_database(self, common: CommonSettings) -> Database | None:
        """The service's database (pool and migrations), or None without DATABASE_URL."""
        if not common.database_url or self.migrations_package is None:
            return None
        return Database(
            common.database_url, load_migrations(self.migrations_package), coalesce=common.coalesce
        )

    def build(self, env: Mapping[str, str]) -> BuiltService:
        """Read the settings from `env`, open nothing yet, and build the app from them."""
        settings = self.read_settings(env)
        common: CommonSettings = settings.common
        return BuiltService(common, self.create_app(settings, database=self.open_database(common)))


def settings_models(services: Mapping[str, ServiceSpec]) -> set[type[Settings]]:
    """The settings models the registry's services read (nested models are read with them)."""
    return {CommonSettings, *(spec.settings for spec in services.values())}


def variables_read(services: Mapping[str, ServiceSpec]) -> Iterator[str]:
    """Every environment variable the registry's services read through their models."""
    for model in settings_models(services):
        yield from env_names(model)


def call_variables(services: Mapping[str, ServiceSpec]) -> dict[str, Call]:
    """Variable → the call it wires, over every service of the registry."""
    return {call.variable: call for spec in services.values() for call in spec.calls}


_JWKS = "/.well-known/jwks.json"

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
            settings=greeter.GreeterSettings,
            create_app=greeter.create_app,
            calls=(Call("caller", "CALLER_BASE_URL"), Call("auth", "AUTH_JWKS_URL", _JWKS)),
        ),
        ServiceSpec(
            name="caller",
            default_port=8081,
            otel_service_name="caller-service",
            database="caller_db",
            migrations_package=caller.MIGRATIONS_PACKAGE,
            connect_paths=("/caller.v1.CallerService",),
            settings=caller.CallerSettings,
            create_app=caller.create_app,
        ),
        ServiceSpec(
            name="gateway",
            default_port=8082,
            otel_service_name="gateway-service",
            database="gateway_db",
            migrations_package=gateway.MIGRATIONS_PACKAGE,
            connect_paths=("/gateway.v1.GatewayService",),
            settings=gateway.GatewaySettings,
            create_app=gateway.create_app,
            calls=(
                Call("custom-lang", "CUSTOM_LANG_BASE_URL"),
                Call("auth", "AUTH_JWKS_URL", _JWKS),
            ),
        ),
        ServiceSpec(
            name="custom-lang",
            default_port=3000,
            otel_service_name="custom-lang-service",
            database="lang_db",
            migrations_package=customlang.MIGRATIONS_PACKAGE,
            connect_paths=("/customlang.v1.CustomLangService",),
            settings=customlang.CustomLangSettings,
            create_app=customlang.create_app,
        ),
        ServiceSpec(
            name="auth",
            default_port=8090,
            otel_service_name="auth-service",
            database="auth_db",
            migrations_package=auth.MIGRATIONS_PACKAGE,
            connect_paths=("/auth.v1.AuthService",),
            settings=auth.AuthSettings,
            create_app=auth.create_app,
        ),
        ServiceSpec(
            name="web",
            default_port=8000,
            otel_service_name="web",
            database=None,
            migrations_package=None,
            connect_paths=(),
            settings=web.WebSettings,
            create_app=web.create_app,
            calls=(
                Call("greeter", "WEB_GREETER_BASE_URL", browser=True),
                Call("gateway", "WEB_GATEWAY_BASE_URL", browser=True),
                Call("auth", "WEB_AUTH_BASE_URL", browser=True),
                Call("gateway", "WEB_BREAKER_URL", "/debug/breaker", browser=True),
                # The relay of the breaker state, for the console behind Traefik.
                Call("gateway", "WEB_BREAKER_UPSTREAM_URL", "/debug/breaker", proxied=True),
            ),
        ),
    )
}
