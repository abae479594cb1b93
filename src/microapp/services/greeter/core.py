"""What every greeter version does for one greeting: check the name, ask the caller service
about the outside world, record the greeting. v1 and v2 differ only in what they answer."""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

import psycopg
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from opentelemetry import trace

from microapp.gen.caller.v1.caller_pb2 import CallExternalRequest, CallExternalResponse
from microapp.platform.db import Database, DatabaseUnavailable

logger = logging.getLogger(__name__)

MAX_NAME_LENGTH = 255
CALLER_DEADLINE_MS = 2000
INSERT_GREETING = "INSERT INTO greetings (name, message, external_status) VALUES (%s, %s, %s)"
# What a client sees when the caller client fails in an unexpected way; the exception itself
# may hold addresses or internals, so it goes to the log only.
CALLER_FAILED_MESSAGE = "caller service failed"


class Caller(Protocol):
    """The slice of the generated `CallerServiceClient` the greeter uses."""

    async def call_external(
        self, request: CallExternalRequest, *, timeout_ms: int | None = None
    ) -> CallExternalResponse: ...


def check_name(name: str) -> None:
    """`invalid_argument` when the name is longer than the greetings table holds."""
    if len(name) > MAX_NAME_LENGTH:
        raise ConnectError(
            Code.INVALID_ARGUMENT, f"name must be at most {MAX_NAME_LENGTH} characters"
        )


def current_trace_id() -> str:
    """The current span's trace id as 32 hex digits; empty when no span is recording."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""


def _caller_failed(code: Code, exc: BaseException) -> ConnectError:
    """A generic error for the client; the details go to the log only."""
    logger.warning("caller service failed", extra={"code": code.name.lower(), "error": repr(exc)})
    return ConnectError(code, CALLER_FAILED_MESSAGE)


class GreeterCore:
    """The caller call and the greetings row, shared by every greeter API version."""

    def __init__(self, caller: Caller, external_api_url: str, database: Database | None) -> None:
        self._caller = caller
        self._external_api_url = external_api_url
        self._database = database

    async def call_caller(self) -> CallExternalResponse:
        """One CallExternal call to the caller service for the configured external URL."""
        try:
            return await self._caller.call_external(
                CallExternalRequest(url=self._external_api_url), timeout_ms=CALLER_DEADLINE_MS
            )
        except ConnectError as exc:
            task = asyncio.current_task()
            if exc.code == Code.CANCELED and task is not None and task.cancelling():
                # This call was cancelled (greeter's own deadline passed, or its client left),
                # and connectrpc's client turned that into CANCELED: let the cancellation go
                # on, so the server answers it as it should (deadline_exceeded for a deadline).
                raise asyncio.CancelledError from exc
            # The caller's own answer passes through. The client's own failure (its deadline,
            # a refused connection) keeps its code but not its text, which names addresses.
            if exc.__cause__ is None or isinstance(exc.__cause__, ConnectError):
                raise
            raise _caller_failed(exc.code, exc) from exc
        except Exception as exc:
            raise _caller_failed(Code.UNAVAILABLE, exc) from exc

    async def record(self, name: str, message: str, external_status: int) -> None:
        """Write the greetings row before the answer leaves (a synchronous write).

        A failed insert is logged and the greeting is still returned: the row is an audit
        record, not state a client relies on.
        """
        if self._database is None:
            return
        try:
            await self._database.record(INSERT_GREETING, (name, message, external_status))
        except (DatabaseUnavailable, psycopg.Error) as exc:
            logger.warning("greeting not recorded", extra={"error": str(exc)})
