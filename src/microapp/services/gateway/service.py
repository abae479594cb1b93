"""gateway.v1.GatewayService: invoke custom-lang through a circuit breaker and a retry budget."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import psycopg
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from starlette.requests import Request
from starlette.responses import JSONResponse

from microapp.gen.gateway.v1.gateway_connect import GatewayService
from microapp.gen.gateway.v1.gateway_pb2 import InvokeCustomRequest, InvokeCustomResponse
from microapp.platform.breaker import BreakerOpenError, CircuitBreaker
from microapp.platform.db import Database, DatabaseUnavailable
from microapp.platform.retry_budget import RetryBudget
from microapp.platform.status_map import connect_code_for_status
from microapp.services.gateway.downstream import DownstreamTimeout, DownstreamUnreachable, Reply

logger = logging.getLogger(__name__)

MAX_NAME_LENGTH = 255
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})
INSERT_INVOCATION = "INSERT INTO invocations (name, result_message, success) VALUES (%s, %s, %s)"


class CustomLang(Protocol):
    """What the gateway needs of custom-lang: one invocation, one reply."""

    async def invoke(self, name: str) -> Reply: ...


def is_failure_status(status: int) -> bool:
    """5xx and 429 are failures for the breaker; other statuses are answers."""
    return status >= 500 or status == 429


class FailedReply(Exception):
    """A 5xx or 429 reply, raised inside the breaker so that it counts as a failure."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(f"HTTP {reply.status}: {reply.message}")
        self.reply = reply


@dataclass(frozen=True)
class Outcome:
    """How one invocation ended: a message, and a Connect code unless it succeeded."""

    message: str
    code: Code | None = None

    @property
    def success(self) -> bool:
        return self.code is None


def _outcome_of_reply(reply: Reply) -> Outcome:
    if 200 <= reply.status < 300:
        return Outcome(reply.message)
    return Outcome(reply.message, connect_code_for_status(reply.status))


# How an attempt can fail: each is one failure for the breaker.
Failure = FailedReply | DownstreamTimeout | DownstreamUnreachable


def _outcome_of_failure(exc: Failure) -> Outcome:
    if isinstance(exc, FailedReply):
        return _outcome_of_reply(exc.reply)
    if isinstance(exc, DownstreamTimeout):
        return Outcome(str(exc), Code.DEADLINE_EXCEEDED)
    return Outcome(str(exc), Code.UNAVAILABLE)


def _is_retryable(exc: Failure) -> bool:
    """429, 502, 503, 504 and timeouts: a second attempt may well get through."""
    if isinstance(exc, FailedReply):
        return exc.reply.status in RETRYABLE_STATUSES
    return isinstance(exc, DownstreamTimeout)


class ResilientInvoker:
    """Each attempt is one outcome of the breaker, as in the seed (`breaker.Execute` for
    the call, and again for its retry). A retryable failure is retried once, only if the
    breaker admits the retry and the budget has a token: a first failure that opened the
    breaker, or a failed half-open trial, is the answer."""

    def __init__(self, custom_lang: CustomLang, breaker: CircuitBreaker, budget: RetryBudget):
        self._custom_lang = custom_lang
        self._breaker = breaker
        self._budget = budget

    async def invoke(self, name: str) -> Outcome:
        try:
            return _outcome_of_reply(await self._attempt(name))
        except BreakerOpenError as exc:
            return Outcome(f"custom-lang not called: {exc}", Code.UNAVAILABLE)
        except (FailedReply, DownstreamTimeout, DownstreamUnreachable) as exc:
            first: Failure = exc
        if not self._may_retry(first):
            return _outcome_of_failure(first)
        logger.debug("retrying custom-lang", extra={"reason": str(first)})
        try:
            return _outcome_of_reply(await self._attempt(name))
        except BreakerOpenError:
            return _outcome_of_failure(first)
        except (FailedReply, DownstreamTimeout, DownstreamUnreachable) as exc:
            return _outcome_of_failure(exc)

    def _may_retry(self, failure: Failure) -> bool:
        # The breaker is asked before the budget so that a retry it would refuse costs
        # no token; nothing is awaited between this and the retry's admission.
        return _is_retryable(failure) and self._breaker.admits() and self._budget.try_acquire()

    async def _attempt(self, name: str) -> Reply:
        return await self._breaker.run(lambda: self._send(name))

    async def _send(self, name: str) -> Reply:
        reply = await self._custom_lang.invoke(name)
        if is_failure_status(reply.status):
            raise FailedReply(reply)
        return reply


class GatewayHandler(GatewayService):
    """Implements the generated `GatewayService` protocol."""

    def __init__(self, invoker: ResilientInvoker, database: Database | None) -> None:
        self._invoker = invoker
        self._database = database

    async def invoke_custom(
        self,
        request: InvokeCustomRequest,
        ctx: RequestContext[InvokeCustomRequest, InvokeCustomResponse],
    ) -> InvokeCustomResponse:
        name = request.name or "World"
        if len(name) > MAX_NAME_LENGTH:
            outcome = Outcome(
                f"name must be at most {MAX_NAME_LENGTH} characters", Code.INVALID_ARGUMENT
            )
        else:
            outcome = await self._invoker.invoke(name)
        # The row holds at most 255 characters of the name; an over-long one is cut.
        await self._record(name[:MAX_NAME_LENGTH], outcome)
        if outcome.code is not None:
            raise ConnectError(outcome.code, outcome.message)
        return InvokeCustomResponse(message=outcome.message)

    async def _record(self, name: str, outcome: Outcome) -> None:
        # Synchronous write of every outcome, failures included: the row exists before
        # the answer is sent. A failed insert is logged and the answer is still given.
        if self._database is None:
            return
        try:
            await self._database.record(INSERT_INVOCATION, (name, outcome.message, outcome.success))
        except (DatabaseUnavailable, psycopg.Error) as exc:
            logger.warning("invocation not recorded", extra={"error": str(exc)})


class BreakerStatusRoute:
    """`GET /debug/breaker`: the breaker's state and the retry budget's tokens.

    Reads snapshots, so looking changes nothing: an open breaker whose period is over
    reads `half_open` but becomes so only when the next call arrives. Behind the token
    check when the service requires tokens (`with_token_check` guards every REST route).
    """

    def __init__(self, breaker: CircuitBreaker, budget: RetryBudget) -> None:
        self._breaker = breaker
        self._budget = budget

    async def handle(self, request: Request) -> JSONResponse:
        breaker = self._breaker.snapshot()
        return JSONResponse(
            {
                "state": breaker.state,
                "consecutive_failures": breaker.consecutive_failures,
                "retry_tokens": self._budget.snapshot().whole_tokens,
            },
            headers={"Cache-Control": "no-store"},
        )
