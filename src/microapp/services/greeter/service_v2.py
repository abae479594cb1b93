"""greeter.v2.GreeterService: greetings in several locales, once or as a server stream."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext

from microapp.gen.greeter.v2.greeter_connect import GreeterService
from microapp.gen.greeter.v2.greeter_pb2 import (
    GreetRequest,
    GreetResponse,
    GreetStreamRequest,
    GreetStreamResponse,
)
from microapp.services.greeter.core import GreeterCore, check_name, current_trace_id
from microapp.services.greeter.locales import checked_locale, localized_greeting

logger = logging.getLogger(__name__)

DEFAULT_STREAM_COUNT = 5
MAX_STREAM_COUNT = 100
MAX_STREAM_INTERVAL_MS = 5000
DEADLINE_SLACK_MS = 10


@dataclass(frozen=True)
class Greeting:
    """One greeting and what the outside world answered while it was made."""

    message: str
    external_status: int
    external_body_length: int
    trace_id: str


@dataclass(frozen=True)
class StreamPlan:
    """How many greetings a stream sends, and how far apart."""

    count: int
    interval_s: float


def stream_plan(request: GreetStreamRequest) -> StreamPlan:
    """The stream's count (0 means the default) and interval; `invalid_argument` outside
    their ranges, before any work is done."""
    count = request.count or DEFAULT_STREAM_COUNT
    if not 1 <= count <= MAX_STREAM_COUNT:
        raise ConnectError(
            Code.INVALID_ARGUMENT,
            f"count must be between 1 and {MAX_STREAM_COUNT} (0 means {DEFAULT_STREAM_COUNT})",
        )
    if not 0 <= request.interval_ms <= MAX_STREAM_INTERVAL_MS:
        raise ConnectError(
            Code.INVALID_ARGUMENT,
            f"interval_ms must be between 0 and {MAX_STREAM_INTERVAL_MS}",
        )
    return StreamPlan(count, request.interval_ms / 1000)


class GreeterV2Handler(GreeterService):
    """Implements the generated `greeter.v2.GreeterService` protocol."""

    def __init__(self, core: GreeterCore) -> None:
        self._core = core

    async def greet(
        self, request: GreetRequest, ctx: RequestContext[GreetRequest, GreetResponse]
    ) -> GreetResponse:
        greeting = await self._greet_once(request.name, request.locale)
        return GreetResponse(
            message=greeting.message,
            external_status=greeting.external_status,
            external_body_length=greeting.external_body_length,
            trace_id=greeting.trace_id,
        )

    async def greet_stream(
        self,
        request: GreetStreamRequest,
        ctx: RequestContext[GreetStreamRequest, GreetStreamResponse],
    ) -> AsyncIterator[GreetStreamResponse]:
        plan = stream_plan(request)
        greeting = await self._greet_once(request.name, request.locale)
        sent = 0
        try:
            for sequence in range(1, plan.count + 1):
                if sequence > 1 and plan.interval_s:
                    # connectrpc cancels this wait when the client goes away or the
                    # deadline passes, which ends the loop at once.
                    await asyncio.sleep(plan.interval_s)
                yield GreetStreamResponse(
                    message=greeting.message,
                    sequence=sequence,
                    external_status=greeting.external_status,
                    external_body_length=greeting.external_body_length,
                    trace_id=greeting.trace_id,
                )
                sent = sequence
        finally:
            if sent < plan.count:
                _log_stopped_early(ctx, sent, plan.count)

    async def _greet_once(self, name: str, locale: str) -> Greeting:
        """Validate, make one caller call and one greetings row: the work behind both calls."""
        check_name(name)
        locale = checked_locale(locale)
        external = await self._core.call_caller()
        message = localized_greeting(name, locale)
        await self._core.record(name or "World", message, external.status_code)
        return Greeting(
            message=message,
            external_status=external.status_code,
            external_body_length=external.body_length,
            trace_id=current_trace_id(),
        )


def _log_stopped_early(ctx: RequestContext[Any, Any], sent: int, count: int) -> None:
    # The handler cannot see why it was stopped, only whether the deadline is (about) due:
    # the event loop may fire the deadline's timer a little before the context's own clock
    # reads it as passed (under pyvoy by a fraction of a millisecond).
    remaining_ms = ctx.timeout_ms
    deadline_due = remaining_ms is not None and remaining_ms <= DEADLINE_SLACK_MS
    reason = "deadline_exceeded" if deadline_due else "cancelled"
    logger.info(
        "stream %s after %d of %d messages",
        reason,
        sent,
        count,
        extra={"stream_stop": reason, "sent": sent, "count": count},
    )
