"""JSON in and out for the REST routes: bounded body reading and errors as JSON."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any, TypeAlias, cast

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

# All a client learns of an unexpected error; the details go to the log only.
INTERNAL_ERROR_MESSAGE = "internal error"


class JsonError(HTTPException):
    """An HTTP error answered as `{"error": message}`."""


def json_error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """An error response of the REST routes."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


# Deeper JSON is refused with a 400. Python's json decoder recurses per level: past the
# interpreter's recursion limit it raises RecursionError (once a 500 with a traceback for a
# body of 100,000 `[`), which is caught here; shallower excess is found by an iterative walk
# of the parsed value. A bracket-counting scan before parsing was measured at about 1 s of
# event-loop time for a 1 MiB body of brackets, so the decoder's own C-level guard is used.
MAX_JSON_DEPTH = 32
_TOO_DEEP = f"JSON nested deeper than {MAX_JSON_DEPTH} levels"


async def read_json_object(request: Request, *, limit: int) -> dict[str, Any]:
    """The request body as a JSON object, read at most `limit` bytes far.

    Raises `JsonError` 415 unless the content type is `application/json` (UTF-8), 413 when
    the body is larger than `limit`, and 400 when it is not a JSON object, is nested deeper
    than `MAX_JSON_DEPTH`, or holds NUL in any string.
    """
    require_json_content_type(request.headers.get("content-type"))
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise JsonError(413, f"body larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise JsonError(413, f"body larger than {limit} bytes")
    return parse_json_object(bytes(body))


def require_json_content_type(content_type: str | None) -> None:
    """Raise `JsonError` 415 unless `content_type` is `application/json`, with at most a
    `charset=utf-8` parameter; a missing content type is refused too."""
    media_type, *parameters = (content_type or "").split(";")
    if media_type.strip().lower() != "application/json":
        raise JsonError(415, "content type must be application/json")
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        charset = value.strip().strip('"').lower()
        if name.strip().lower() == "charset" and charset not in {"utf-8", "utf8"}:
            raise JsonError(415, "content type must be application/json with charset=utf-8")


# A parsed JSON value, as `json.loads` builds it.
Json: TypeAlias = dict[str, "Json"] | list["Json"] | str | int | float | bool | None


def json_object(value: object) -> dict[str, Json] | None:
    """A parsed JSON value as the object it is (JSON object keys are strings), or None."""
    return cast("dict[str, Json]", value) if isinstance(value, dict) else None


def parse_json_object(body: bytes) -> dict[str, Any]:
    """`body` as a UTF-8 JSON object; `JsonError` 400 when it is malformed, not an object,
    nested deeper than `MAX_JSON_DEPTH`, or holds NUL in a key or a string value."""
    try:
        text = body.decode("utf-8")
        value: Json = json.loads(text)
    except RecursionError:
        raise JsonError(400, _TOO_DEEP) from None
    except ValueError:  # UnicodeDecodeError included
        raise JsonError(400, "body is not valid JSON") from None
    if not isinstance(value, dict):
        raise JsonError(400, "body must be a JSON object")
    # Fewer brackets than the limit cannot nest past it, so most bodies skip the walk.
    too_many_brackets = text.count("[") + text.count("{") > MAX_JSON_DEPTH
    if too_many_brackets and json_nesting(value) > MAX_JSON_DEPTH:
        raise JsonError(400, _TOO_DEEP)
    # NUL can only arrive escaped: raw control characters are not valid JSON.
    if "\\u0000" in text:
        for name, member in value.items():
            # PostgreSQL cannot store NUL in text; refused here, before any route sees it.
            if "\x00" in name:
                raise JsonError(400, "member names must not contain NUL characters")
            if json_holds_nul(member):
                raise JsonError(400, f"{name} must not contain NUL characters")
    return value


def json_nesting(value: Json) -> int:
    """How deep arrays and objects nest in a parsed JSON value (a scalar is 0), walked one
    level at a time without recursion."""
    depth = 0
    level: list[dict[str, Json] | list[Json]] = [value] if isinstance(value, dict | list) else []
    while level:
        depth += 1
        children: list[Json] = []
        for item in level:
            children.extend(item.values() if isinstance(item, dict) else item)
        level = [child for child in children if isinstance(child, dict | list)]
    return depth


def json_holds_nul(value: Json) -> bool:
    """Whether any string in a parsed JSON value, object keys included, contains NUL."""
    stack: list[Json] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def string_field(body: dict[str, Any], name: str) -> str:
    """A string member of a JSON body; absent or null means empty."""
    value = body.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise JsonError(400, f"{name} must be a string")
    return value


async def http_exception_handler(request: Request, exc: Exception) -> Response:
    """Starlette's HTTP errors (404, 405, ...) as JSON instead of plain text."""
    assert isinstance(exc, HTTPException)
    if exc.status_code in {204, 304}:
        return Response(status_code=exc.status_code, headers=exc.headers)
    return json_error(exc.status_code, str(exc.detail), headers=exc.headers)


async def internal_error_handler(request: Request, exc: Exception) -> Response:
    """Anything unexpected: logged with its traceback, answered without one."""
    logger.error("unhandled error", exc_info=exc, extra={"path": request.url.path})
    return json_error(500, INTERNAL_ERROR_MESSAGE)


class InternalErrorsAsJson:
    """ASGI middleware: an exception escaping a route is logged once, at ERROR with its
    traceback and route, and answered 500 `{"error": "internal error"}`.

    Starlette's own handler for `Exception` answers the same but then re-raises, so
    Hypercorn logged every such error a second time. Not re-raising changes nothing for
    the client: once an answer has started, Hypercorn ends the stream either way.
    """

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._app(scope, receive, tracking_send)
        except ClientDisconnect:
            # The client left while its body was read: nobody is there to answer, and
            # nothing failed on our side, so it is no error.
            logger.info(
                "client disconnected before its request was read",
                extra={"method": scope.get("method"), "path": scope.get("path")},
            )
        except Exception:
            logger.exception(
                "unhandled error", extra={"method": scope.get("method"), "path": scope.get("path")}
            )
            if not started:
                await json_error(500, INTERNAL_ERROR_MESSAGE)(scope, receive, send)
