"""Builds the web service: the console's static files and `/config.json` from env."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, field_validator
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from microapp.platform.config import CommonSettings, ConfigError, Settings, variable
from microapp.platform.db import Database
from microapp.platform.http import ServiceParts, build_app
from microapp.services.web.relay import BreakerRelay

# index.html and assets/ (the esbuild bundle and CSS), shipped inside the Python package.
CONSOLE_DIR = Path(str(files("microapp") / "web"))


class WebSettings(Settings):
    """Where the browser finds the services; empty means the console's own origin."""

    common: CommonSettings = Field(default_factory=CommonSettings)
    greeter_base_url: str = variable("WEB_GREETER_BASE_URL", "")
    gateway_base_url: str = variable("WEB_GATEWAY_BASE_URL", "")
    auth_base_url: str = variable("WEB_AUTH_BASE_URL", "")
    # Empty: the gateway's base URL + /debug/breaker.
    breaker_url: str = variable("WEB_BREAKER_URL", "")
    breaker_poll_ms: int = variable("WEB_BREAKER_POLL_MS", 1000, ge=100)
    # Where the web service itself asks for the breaker status it answers on /debug/breaker.
    breaker_upstream_url: str = variable("WEB_BREAKER_UPSTREAM_URL", "")

    @field_validator("greeter_base_url", "gateway_base_url", "auth_base_url", "breaker_url")
    @classmethod
    def _browser_url(cls, value: str) -> str:
        """An absolute http(s) URL or a path on the console's origin, without a trailing slash."""
        value = value.rstrip("/")
        if not value or value.startswith("/"):
            return value
        parts = urlsplit(value)
        if parts.scheme not in {"http", "https"} or not parts.netloc:
            raise ValueError("must be an http(s) URL or a path like /api")
        return value

    @field_validator("breaker_upstream_url")
    @classmethod
    def _upstream_url(cls, value: str) -> str:
        """An absolute http(s) URL the web service itself fetches, or empty."""
        parts = urlsplit(value)
        if value and (parts.scheme not in {"http", "https"} or not parts.netloc):
            raise ValueError("must be an http(s) URL")
        return value

    def console_config(self) -> dict[str, Any]:
        """The JSON the console reads at startup (`/config.json`)."""
        breaker = self.breaker_url
        if not breaker and self.gateway_base_url:
            breaker = f"{self.gateway_base_url}/debug/breaker"
        return {
            "greeterBaseUrl": self.greeter_base_url,
            "gatewayBaseUrl": self.gateway_base_url,
            "authBaseUrl": self.auth_base_url,
            "breakerUrl": breaker,
            "breakerPollMs": self.breaker_poll_ms,
        }

    def connect_sources(self) -> list[str]:
        """Origins the page may call besides its own, for its Content-Security-Policy."""
        origins: list[str] = []
        for url in (
            self.greeter_base_url,
            self.gateway_base_url,
            self.auth_base_url,
            self.breaker_url,
        ):
            parts = urlsplit(url)
            origin = f"{parts.scheme}://{parts.netloc}" if parts.netloc else ""
            if origin and origin not in origins:
                origins.append(origin)
        return origins


class _ConsoleAssets(StaticFiles):
    """The bundle keeps one name across builds, so browsers must revalidate (ETag) each load."""

    def file_response(
        self, full_path: Any, stat_result: os.stat_result, scope: Scope, status_code: int = 200
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response


def create_app(
    settings: WebSettings,
    *,
    database: Database | None = None,
    console_dir: Path = CONSOLE_DIR,
) -> Starlette:
    """The web service as an ASGI app: `/` the console, `/config.json` where the services are."""
    index = console_dir / "index.html"
    if not index.is_file():
        raise ConfigError(f"the console is missing from the package ({index}); run `make web`")
    connect_src = " ".join(["'self'", *settings.connect_sources()])
    page_headers = {
        "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Content-Security-Policy": (
            f"default-src 'self'; connect-src {connect_src}; img-src 'self' data:; "
            "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        ),
    }
    config = settings.console_config()
    routes: list[BaseRoute] = [
        Route("/", console_page(index, page_headers), methods=["GET"]),
        Route("/index.html", console_page(index, page_headers), methods=["GET"]),
        Route("/config.json", console_config(config), methods=["GET"]),
        Mount("/assets", app=_ConsoleAssets(directory=console_dir / "assets"), name="assets"),
    ]
    resources: list[AbstractAsyncContextManager[object]] = []
    if settings.breaker_upstream_url:
        relay = BreakerRelay(settings.breaker_upstream_url)
        resources.append(relay)
        routes.append(Route("/debug/breaker", relay.handle, methods=["GET"]))
    return build_app(
        settings.common,
        ServiceParts(
            connect=[], proto_files=[], routes=routes, database=database, resources=resources
        ),
    )


def console_page(index: Path, headers: dict[str, str]) -> Callable[[Request], Awaitable[Response]]:
    """`GET /`: the console's page."""

    async def page(request: Request) -> Response:
        return FileResponse(index, media_type="text/html; charset=utf-8", headers=headers)

    return page


def console_config(config: dict[str, Any]) -> Callable[[Request], Awaitable[Response]]:
    """`GET /config.json`: where the console finds the services."""

    async def answer(request: Request) -> Response:
        return JSONResponse(config, headers={"Cache-Control": "no-store"})

    return answer
