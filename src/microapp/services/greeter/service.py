"""greeter.v1.GreeterService: greet, after asking the caller service about the outside world."""

from __future__ import annotations

import logging
from typing import Protocol

import psycopg
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext

from microapp.gen.caller.v1.caller_pb2 import CallExternalRequest, CallExternalResponse
from microapp.gen.greeter.v1.greeter_pb2 import GreetRequest, GreetResponse
from microapp.platform.db import Database, DatabaseUnavailable

logger = logging.getLogger(__name__)

MAX_NAME_LENGTH = 255
CALLER_DEADLINE_MS = 2000
INSERT_GREETING = "INSERT INTO greetings (name, message, external_status) VALUES (%s, %s, %s)"


class Caller(Protocol):
    """The slice of the generated `CallerServiceClient` the greeter uses."""

    async def call_external(
        self, request: CallExternalRequest, *, timeout_ms: int | None = None
    ) -> CallExternalResponse: ...


def greeting_for(name: str) -> str:
    """The greeting text; an empty name greets the World."""
    return f"Hello {name or 'World'} from greeter-service!"


class GreeterHandler:
    """Implements the generated `GreeterService` protocol."""

    def __init__(self, caller: Caller, external_api_url: str, database: Database | None) -> None:
        self._caller = caller
        self._external_api_url = external_api_url
        self._database = database

    async def greet(
        self, request: GreetRequest, ctx: RequestContext[GreetRequest, GreetResponse]
    ) -> GreetResponse:
        name = request.name or "World"
        if len(name) > MAX_NAME_LENGTH:
            raise ConnectError(
                Code.INVALID_ARGUMENT, f"name must be at most {MAX_NAME_LENGTH} characters"
            )
        external = await self._call_caller()
        message = greeting_for(name)
        await self._record(name, message, external.status_code)
        logger.debug("greeted", extra={"greeted": name, "external_status": external.status_code})
        return GreetResponse(
            message=message,
            external_status=external.status_code,
            external_body_length=external.body_length,
        )

    async def _call_caller(self) -> CallExternalResponse:
        try:
            return await self._caller.call_external(
                CallExternalRequest(url=self._external_api_url), timeout_ms=CALLER_DEADLINE_MS
            )
        except ConnectError:
            # The caller's own code passes through; the client reports its deadline as
            # deadline_exceeded and a transport failure as unavailable.
            raise
        except Exception as exc:
            raise ConnectError(Code.UNAVAILABLE, f"caller service failed: {exc}") from exc

    async def _record(self, name: str, message: str, external_status: int) -> None:
        # Synchronous write: the row exists before the response is sent. A failed
        # insert is logged and the greeting is still returned.
        if self._database is None:
            return
        try:
            await self._database.record(INSERT_GREETING, (name, message, external_status))
        except (DatabaseUnavailable, psycopg.Error) as exc:
            logger.warning("greeting not recorded", extra={"error": str(exc)})
