"""JSON in and out for the REST routes: bounded body reading and errors as JSON."""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

logger = logging.getLogger(__name__)


class JsonError(HTTPException):
    """An HTTP error answered as `{"error": message}`."""


def json_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """An error response of the REST routes."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def read_json_object(request: Request, *, limit: int) -> dict[str, Any]:
    """The request body as a JSON object, read at most `limit` bytes far.

    Raises `JsonError` 413 when the body is larger than `limit`, 415 for another
    content type, and 400 when it is not a JSON object.
    """
    content_type = request.headers.get("content-type", "application/json")
    if content_type.split(";")[0].strip().lower() not in {"application/json", ""}:
        raise JsonError(415, "content type must be application/json")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise JsonError(413, f"body larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise JsonError(413, f"body larger than {limit} bytes")
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise JsonError(400, "body is not valid JSON") from None
    if not isinstance(value, dict):
        raise JsonError(400, "body must be a JSON object")
    return value


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
    logger.exception("unhandled error", extra={"path": request.url.path})
    return json_error(500, "internal error")
