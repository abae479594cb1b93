"""caller.v1.CallerService: GET an external URL and report its status and body length."""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol
from urllib.parse import urlsplit

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext

from microapp.gen.caller.v1.caller_pb2 import CallExternalRequest, CallExternalResponse
from microapp.services.caller.fetch import FetchFailed, FetchResult, FetchTimeout

INSERT_CALL_LOG = "INSERT INTO call_logs (url, status_code, body_length) VALUES (%s, %s, %s)"


class Fetcher(Protocol):
    async def fetch(self, url: str) -> FetchResult: ...


class CallLog(Protocol):
    def offer(self, row: tuple[str, int, int]) -> bool: ...


def validate_url(url: str, allowed_hosts: Collection[str]) -> None:
    """Refuse anything but an absolute http(s) URL, and hosts outside the allowlist."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        _ = parts.port  # raises ValueError for a port out of range
    except ValueError:
        raise ConnectError(Code.INVALID_ARGUMENT, f"url is not a valid URL: {url!r}") from None
    if parts.scheme not in {"http", "https"} or not host:
        raise ConnectError(
            Code.INVALID_ARGUMENT, f"url must be an absolute http(s) URL, got {url!r}"
        )
    if allowed_hosts and host.lower() not in allowed_hosts:
        raise ConnectError(Code.PERMISSION_DENIED, f"host {host!r} is not in CALLER_ALLOWED_HOSTS")


class CallerHandler:
    """Implements the generated `CallerService` protocol."""

    def __init__(
        self,
        fetcher: Fetcher,
        call_log: CallLog | None,
        *,
        allowed_hosts: Collection[str] = (),
    ) -> None:
        self._fetcher = fetcher
        self._call_log = call_log
        self._allowed_hosts = frozenset(h.lower() for h in allowed_hosts)

    async def call_external(
        self,
        request: CallExternalRequest,
        ctx: RequestContext[CallExternalRequest, CallExternalResponse],
    ) -> CallExternalResponse:
        url = request.url.strip()
        validate_url(url, self._allowed_hosts)
        try:
            result = await self._fetcher.fetch(url)
        except FetchTimeout as exc:
            raise ConnectError(Code.DEADLINE_EXCEEDED, str(exc)) from exc
        except FetchFailed as exc:
            raise ConnectError(Code.UNAVAILABLE, str(exc)) from exc
        if self._call_log is not None:
            # Written after the response, off the request path; never blocks it.
            self._call_log.offer((url, result.status_code, result.body_length))
        return CallExternalResponse(status_code=result.status_code, body_length=result.body_length)
