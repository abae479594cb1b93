"""custom-lang's REST endpoint as the gateway reaches it: `POST {base}/invoke` with aiohttp."""

from __future__ import annotations

import json
from dataclasses import dataclass

import aiohttp

from microapp.platform.clients import HttpClient
from microapp.platform.rest import json_object

# An answer is a short JSON object; reading more would only let a broken downstream
# make the gateway hold its garbage.
MAX_REPLY_BYTES = 64 * 1024
MAX_MESSAGE_CHARS = 1000


@dataclass(frozen=True)
class Reply:
    """custom-lang's HTTP status and the message or error text of its body."""

    status: int
    message: str


class DownstreamTimeout(Exception):
    """custom-lang did not answer within the attempt's timeout."""


class DownstreamUnreachable(Exception):
    """custom-lang could not be reached (refused, reset, broken response)."""


def message_of(status: int, raw: bytes) -> str:
    """`message` of a 2xx JSON body, `error` of another; the text itself otherwise."""
    key = "message" if 200 <= status < 300 else "error"
    try:
        body = json_object(json.loads(raw))
    except (ValueError, UnicodeDecodeError):
        body = None
    message = body.get(key) if body is not None else None
    if isinstance(message, str):
        return message[:MAX_MESSAGE_CHARS]
    text = raw.decode("utf-8", errors="replace").strip()
    return text[:MAX_MESSAGE_CHARS] or f"custom-lang answered HTTP {status}"


class CustomLangClient(HttpClient):
    """custom-lang's `/invoke` over one aiohttp session: `async with CustomLangClient(...)`."""

    def __init__(self, base_url: str, *, timeout_s: float = 1.0) -> None:
        self.url = base_url.rstrip("/") + "/invoke"
        self.timeout_s = timeout_s

    def open_session(self) -> aiohttp.ClientSession:
        """A session with the attempt's timeout and no pool limit."""
        return aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            # The breaker, not a pool limit, bounds what reaches custom-lang; a limit
            # would turn waiting for a connection into timeouts.
            connector=aiohttp.TCPConnector(limit=0),
        )

    async def invoke(self, name: str) -> Reply:
        """POST `{"name": name}`; any HTTP status is a reply, only failing to get one raises."""
        try:
            async with self.session.post(self.url, json={"name": name}) as resp:
                raw = await resp.content.read(MAX_REPLY_BYTES)
                return Reply(resp.status, message_of(resp.status, raw))
        except TimeoutError as exc:
            raise DownstreamTimeout(
                f"custom-lang did not answer within {self.timeout_s} s"
            ) from exc
        except aiohttp.ClientError as exc:
            raise DownstreamUnreachable(
                f"custom-lang unreachable: {exc or type(exc).__name__}"
            ) from exc
