"""Builds the custom-lang service: settings, rules, database, ASGI app."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import NoDecode
from starlette.applications import Starlette
from starlette.routing import Route

from microapp.gen.customlang.v1 import customlang_pb2
from microapp.gen.customlang.v1.customlang_connect import CustomLangServiceASGIApplication
from microapp.platform.config import CommonSettings, Settings, variable
from microapp.platform.db import Database
from microapp.platform.http import ConnectService, ServiceParts, build_app
from microapp.services.customlang.rules import DEFAULT_RULES, parse_rules
from microapp.services.customlang.service import CustomLangHandler, InvokeRoute, Responder

# Its SQL migrations (migrations/*.sql) ship in the service's own package.
MIGRATIONS_PACKAGE = "microapp.services.customlang"


class CustomLangSettings(Settings):
    """custom-lang's own settings beside the common ones."""

    common: CommonSettings = Field(default_factory=CommonSettings)
    # Parsed (and checked) by parse_rules, not by pydantic-settings' JSON decoding.
    response_rules: Annotated[Mapping[str, int], NoDecode] = variable(
        "LANG_RESPONSE_RULES", default_factory=lambda: dict(DEFAULT_RULES)
    )

    @field_validator("response_rules", mode="before")
    @classmethod
    def _parse(cls, value: object) -> object:
        return parse_rules(value) if isinstance(value, str) else value


def create_app(settings: CustomLangSettings, *, database: Database | None = None) -> Starlette:
    """The custom-lang service as an ASGI app; `database` is the platform's (or a test's)."""
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
