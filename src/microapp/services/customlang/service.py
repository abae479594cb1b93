"""custom-lang's one behaviour, `invoke`, and its two faces: REST `POST /invoke` and the
Connect `customlang.v1.CustomLangService/Invoke`."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus

import psycopg
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from microapp.gen.customlang.v1.customlang_connect import CustomLangService
from microapp.gen.customlang.v1.customlang_pb2 import InvokeRequest, InvokeResponse
from microapp.platform.db import Database, DatabaseUnavailable
from microapp.platform.rest import json_error, read_json_object, string_field
from microapp.platform.status_map import connect_code_for_status

logger = logging.getLogger(__name__)

MAX_NAME_LENGTH = 255
# A rule for "*" sets the status of every name without a rule of its own.
ANY_NAME = "*"
INSERT_EXECUTION = "INSERT INTO executions (name, result_message, status_code) VALUES (%s, %s, %s)"


@dataclass(frozen=True)
class Answer:
    """What an invocation answers: 200 with a greeting, or an error status and message."""

    status: int
    message: str

    @property
    def ok(self) -> bool:
        return self.status == 200


def greeting_for(name: str) -> str:
    return f"Hello {name} from custom-lang-service!"


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class Responder:
    """Answers a name by the rules table and records every execution before answering."""

    def __init__(self, rules: Mapping[str, int], database: Database | None) -> None:
        self._rules = dict(rules)
        self._database = database

    async def invoke(self, name: str) -> Answer:
        name = name or "World"
        if len(name) > MAX_NAME_LENGTH:
            answer = Answer(400, f"name must be at most {MAX_NAME_LENGTH} characters")
        else:
            status = self._rules.get(name, self._rules.get(ANY_NAME, 200))
            if status == 200:
                answer = Answer(200, greeting_for(name))
            else:
                answer = Answer(
                    status, f"{_phrase(status)}: custom-lang answers {status} for {name!r}"
                )
        # The row holds at most 255 characters of the name; an over-long one is cut.
        await self._record(name[:MAX_NAME_LENGTH], answer)
        return answer

    async def _record(self, name: str, answer: Answer) -> None:
        # Synchronous write: the row exists before the answer is sent. A failed insert
        # is logged and the answer is still given.
        if self._database is None:
            return
        try:
            await self._database.record(INSERT_EXECUTION, (name, answer.message, answer.status))
        except (DatabaseUnavailable, psycopg.Error) as exc:
            logger.warning("execution not recorded", extra={"error": str(exc)})


class InvokeRoute:
    """`POST /invoke {"name": ...}` → 200 `{"message"}` or the rule's status `{"error"}`."""

    def __init__(self, responder: Responder, *, max_body_bytes: int) -> None:
        self._responder = responder
        self._max_body_bytes = max_body_bytes

    async def handle(self, request: Request) -> Response:
        body = await read_json_object(request, limit=self._max_body_bytes)
        answer = await self._responder.invoke(string_field(body, "name"))
        if answer.ok:
            return JSONResponse({"message": answer.message})
        return json_error(answer.status, answer.message)


class CustomLangHandler(CustomLangService):
    """Implements the generated `CustomLangService` protocol."""

    def __init__(self, responder: Responder) -> None:
        self._responder = responder

    async def invoke(
        self, request: InvokeRequest, ctx: RequestContext[InvokeRequest, InvokeResponse]
    ) -> InvokeResponse:
        answer = await self._responder.invoke(request.name)
        if not answer.ok:
            raise ConnectError(connect_code_for_status(answer.status), answer.message)
        return InvokeResponse(message=answer.message)
