"""The ASGI apps the benchmark serves, built through the services' own app factories.

Scenario (a) measures the Connect stack itself: the real greeter app from
`microapp.services.greeter.app.create_app`, with its caller client replaced by an
in-process fake at the factory's `caller=` seam and no database. Nothing here is
bench-only code inside the services.
"""

from __future__ import annotations

from starlette.applications import Starlette

from microapp.gen.caller.v1.caller_pb2 import CallExternalRequest, CallExternalResponse
from microapp.platform.config import CommonSettings
from microapp.services.greeter.app import GreeterSettings, create_app

FAKE_EXTERNAL_STATUS = 200
FAKE_EXTERNAL_BODY_LENGTH = 1256


class FakeCaller:
    """Answers `CallExternal` at once, as if the outside world were instant."""

    async def call_external(
        self, request: CallExternalRequest, *, timeout_ms: int | None = None
    ) -> CallExternalResponse:
        return CallExternalResponse(
            status_code=FAKE_EXTERNAL_STATUS, body_length=FAKE_EXTERNAL_BODY_LENGTH
        )


def unary_greeter_app() -> Starlette:
    """The greeter's ASGI app with a fake caller and no database."""
    settings = GreeterSettings(
        common=CommonSettings(service="greeter", otel_service_name="greeter-bench")
    )
    return create_app(settings, caller=FakeCaller(), database=None)
