"""Builds the custom-lang service: settings, rules, database, ASGI app."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.routing import Route

from microapp.gen.customlang.v1 import customlang_pb2
from microapp.gen.customlang.v1.customlang_connect import CustomLangServiceASGIApplication
from microapp.platform.coalesce import CoalesceSettings
from microapp.platform.config import CommonSettings
from microapp.platform.db import Database
from microapp.platform.http import ConnectService, ServiceParts, build_app
from microapp.platform.migrations import load_migrations
from microapp.services.customlang.rules import DEFAULT_RULES, parse_rules
from microapp.services.customlang.service import CustomLangHandler, InvokeRoute, Responder

MIGRATIONS_PACKAGE = "microapp.services.customlang"


@dataclass(frozen=True)
class CustomLangSettings:
    """custom-lang's own settings beside the common ones."""

    common: CommonSettings
    response_rules: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_RULES))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> CustomLangSettings:
        """Read `LANG_RESPONSE_RULES` and the common variables."""
        env = os.environ if env is None else env
        return cls(
            common=CommonSettings.from_env(
                "custom-lang", default_port=3000, default_otel_name="custom-lang-service", env=env
            ),
            response_rules=parse_rules(env.get("LANG_RESPONSE_RULES", "")),
        )


def create_app(settings: CustomLangSettings, *, database: Database | None = None) -> Starlette:
    """The custom-lang service as an ASGI app; `database` defaults to one from the settings."""
    if database is None and settings.common.database_url:
        database = Database(
            settings.common.database_url,
            load_migrations(MIGRATIONS_PACKAGE),
            coalesce=CoalesceSettings.from_env(),
        )
    responder = Responder(settings.response_rules, database)
    invoke = InvokeRoute(responder, max_body_bytes=settings.common.max_body_bytes)
    return build_app(
        settings.common,
        ServiceParts(
            connect=[
                ConnectService(CustomLangServiceASGIApplication, CustomLangHandler(responder))
            ],
            proto_files=[customlang_pb2.DESCRIPTOR],
            routes=[Route("/invoke", invoke.handle, methods=["POST"])],
            database=database,
        ),
    )
