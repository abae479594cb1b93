"""`GET /debug/breaker` on the console's own origin, answered by asking the gateway.

Behind Traefik only the Connect paths reach the gateway and everything else reaches the
web service, so the console's same-origin breaker view would find nothing there; with
`WEB_BREAKER_UPSTREAM_URL` set, the web service relays the gateway's answer instead.

The browser's `Authorization` header is passed on (and nothing else of its request), so a
gateway that requires tokens answers the console as it would answer the browser itself:
401 without a valid token, the status with one. The relay adds no credentials of its own.
"""

from __future__ import annotations

import aiohttp
from starlette.requests import Request
from starlette.responses import Response

from microapp.platform.clients import HttpClient
from microapp.platform.rest import json_error

# The gateway answers a few dozen bytes; anything much larger is not its breaker status.
MAX_BODY_BYTES = 64 * 1024


class BreakerRelay(HttpClient):
    """Fetches the gateway's breaker status for the browser; a resource of the web app."""

    def __init__(self, upstream_url: str, *, timeout_s: float = 2.0) -> None:
        self._upstream_url = upstream_url
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    def open_session(self) -> aiohttp.ClientSession:
        """A session bounded by the relay's timeout."""
        return aiohttp.ClientSession(timeout=self._timeout)

    async def handle(self, request: Request) -> Response:
        """The gateway's JSON as it answered it, or 502 saying why there is none."""
        authorization = request.headers.get("authorization")
        headers = {"Authorization": authorization} if authorization else {}
        try:
            async with self.session.get(self._upstream_url, headers=headers) as upstream:
                body = await upstream.content.read(MAX_BODY_BYTES + 1)
                status, content_type = upstream.status, upstream.content_type
        except (aiohttp.ClientError, TimeoutError) as exc:
            reason = str(exc) or type(exc).__name__
            return json_error(502, f"gateway breaker status unreachable: {reason}")
        if len(body) > MAX_BODY_BYTES or content_type != "application/json":
            return json_error(502, "gateway breaker status is not a small JSON document")
        answer_headers = {"Cache-Control": "no-store"}
        if status == 401:
            answer_headers["WWW-Authenticate"] = "Bearer"
        return Response(
            body,
            status_code=status,
            media_type="application/json",
            headers=answer_headers,
        )
