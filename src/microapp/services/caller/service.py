"""caller.v1.CallerService: GET an external URL and report its status and body length."""

from __future__ import annotations

from typing import Protocol
from urllib.parse import urlsplit

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from yarl import URL

from microapp.gen.caller.v1.caller_connect import CallerService
from microapp.gen.caller.v1.caller_pb2 import CallExternalRequest, CallExternalResponse
from microapp.services.caller.fetch import (
    BodyTooLarge,
    FetchFailed,
    FetchResult,
    FetchTimeout,
    RedirectRefused,
)
from microapp.services.caller.guard import TargetRefused

INSERT_CALL_LOG = "INSERT INTO call_logs (url, status_code, body_length) VALUES (%s, %s, %s)"
# Longer URLs are refused before anything else: browsers and proxies stop near here, and
# every message that quotes a URL (over gRPC, a trailer) stays small.
MAX_URL_LENGTH = 8192
# How much of a refused URL an error message quotes.
_QUOTED = 100


class Fetcher(Protocol):
    async def fetch(self, url: str) -> FetchResult: ...


class CallLog(Protocol):
    def offer(self, row: tuple[str, int, int]) -> bool: ...


def validate_url(url: str) -> None:
    """Refuse control characters, then anything but an absolute http(s) URL.

    The target rules (allowlist, addresses) are the fetcher's: they apply to every hop.
    """
    if len(url) > MAX_URL_LENGTH:
        raise ConnectError(
            Code.INVALID_ARGUMENT,
            f"url is {len(url)} characters long, at most {MAX_URL_LENGTH}: {_quote(url)}",
        )
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in url):
        # Checked first: such a URL must reach neither the network nor the database.
        raise ConnectError(Code.INVALID_ARGUMENT, f"url contains control characters: {_quote(url)}")
    try:
        parts = urlsplit(url)
        host = parts.hostname
        _ = parts.port  # raises ValueError for a port out of range
        # As aiohttp and the resolver will read the host (IDNA: empty labels, soft hyphens).
        (URL(url).raw_host or "").encode("idna")
    except ValueError:
        message = f"url is not a valid URL: {_quote(url)}"
        raise ConnectError(Code.INVALID_ARGUMENT, message) from None
    if parts.scheme not in {"http", "https"} or not host:
        raise ConnectError(
            Code.INVALID_ARGUMENT, f"url must be an absolute http(s) URL, got {_quote(url)}"
        )


def _quote(url: str) -> str:
    """The URL as an error message shows it: repr'd, and cut short when long."""
    shown = url if len(url) <= _QUOTED else url[:_QUOTED] + "…"
    return repr(shown)


class CallerHandler(CallerService):
    """Implements the generated `CallerService` protocol."""

    def __init__(self, fetcher: Fetcher, call_log: CallLog | None) -> None:
        self._fetcher = fetcher
        self._call_log = call_log

    async def call_external(
        self,
        request: CallExternalRequest,
        ctx: RequestContext[CallExternalRequest, CallExternalResponse],
    ) -> CallExternalResponse:
        url = request.url.strip(" ")
        validate_url(url)
        try:
            result = await self._fetcher.fetch(url)
        except TargetRefused as exc:
            raise ConnectError(Code.PERMISSION_DENIED, str(exc)) from exc
        except BodyTooLarge as exc:
            raise ConnectError(Code.RESOURCE_EXHAUSTED, str(exc)) from exc
        except RedirectRefused as exc:
            raise ConnectError(Code.FAILED_PRECONDITION, str(exc)) from exc
        except FetchTimeout as exc:
            raise ConnectError(Code.DEADLINE_EXCEEDED, str(exc)) from exc
        except FetchFailed as exc:
            raise ConnectError(Code.UNAVAILABLE, str(exc)) from exc
        if self._call_log is not None:
            # Written after the response, off the request path; never blocks it.
            self._call_log.offer((url, result.status_code, result.body_length))
        return CallExternalResponse(status_code=result.status_code, body_length=result.body_length)
