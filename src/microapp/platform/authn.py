"""Bearer-token checks any service can turn on with `AUTH_REQUIRED=1`.

Tokens are the auth service's RS256 JWTs. A service that requires them fetches the auth
service's public keys from `AUTH_JWKS_URL`, keeps them for `AUTH_JWKS_TTL_S`, and fetches
again sooner only when a token names a key id it does not know (the auth service's key
changed), at most once per few seconds. Connect calls without
a valid token are answered `unauthenticated` by an interceptor that runs before the request
body is read; REST routes answer 401 JSON. `/healthz` and `/livez` are not guarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from jose import jwk, jwt
from jose.backends.base import Key
from starlette.datastructures import Headers
from starlette.routing import BaseRoute, Match
from starlette.types import Receive, Scope, Send

from microapp.platform.clients import HttpClient
from microapp.platform.config import CommonSettings, ConfigError
from microapp.platform.rest import json_error, json_object

logger = logging.getLogger(__name__)

ISSUER = "auth-service"
ALGORITHM = "RS256"
MAX_JWKS_BYTES = 64 * 1024
# How long fetched keys are trusted: a key auth stopped publishing stops verifying after this.
DEFAULT_JWKS_TTL_S = 300.0
# The least time between two fetches, whatever asks for them: tokens with made-up key ids
# (or auth being away) cost auth at most one request per this many seconds per service.
DEFAULT_MIN_REFRESH_INTERVAL_S = 5.0

_DECODE_OPTIONS = {
    "verify_signature": True,
    "verify_exp": True,
    "verify_iss": True,
    "verify_aud": False,
    "require_exp": True,
    "require_iat": True,
    "require_iss": True,
    "require_sub": True,
}


class InvalidToken(Exception):
    """The token is missing, malformed, forged, expired or not ours."""


class UnknownKeyId(InvalidToken):
    """The token is signed with a key id that is not in the key set we hold."""


class KeysUnavailable(Exception):
    """The public keys could not be fetched, so no token can be checked right now."""


@dataclass(frozen=True)
class Principal:
    """Who a valid token speaks for."""

    user_id: str
    role: str


class TokenVerifier(Protocol):
    """Something that turns a bearer token into a `Principal` or refuses it."""

    async def verify(self, token: str) -> Principal: ...


_current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "microapp_principal", default=None
)


def current_principal() -> Principal | None:
    """The caller of the request being handled, when the service requires tokens."""
    return _current_principal.get()


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def rsa_public_key(jwk_dict: Mapping[str, Any]) -> Key:
    """A verification key built from one RSA JWK; `ValueError` when it is not usable."""
    if jwk_dict.get("kty") != "RSA" or jwk_dict.get("alg", ALGORITHM) != ALGORITHM:
        raise ValueError("not an RS256 key")
    if jwk_dict.get("use", "sig") != "sig":
        raise ValueError("not a signing key")
    try:
        return jwk.construct(dict(jwk_dict), ALGORITHM)
    except Exception as exc:
        raise ValueError(f"unusable RSA key: {exc}") from exc


def verify_jwt(token: str, keys: Mapping[str, Key]) -> Principal:
    """Check one token against keys by kid: RS256 only, our issuer, a known kid, unexpired.

    Raises `UnknownKeyId` for a well-formed token naming another kid, `InvalidToken`
    for everything else that is wrong with it.
    """
    try:
        header = jwt.get_unverified_header(token)
    except Exception:
        raise InvalidToken("token is malformed") from None
    # Refuse before touching any key: `none`, HS256 signed with the public key as the
    # secret, and every other algorithm confusion end here.
    if header.get("alg") != ALGORITHM:
        raise InvalidToken("token algorithm must be RS256")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise InvalidToken("token has no key id")
    key = keys.get(kid)
    if key is None:
        raise UnknownKeyId("token is signed with an unknown key")
    try:
        claims = jwt.decode(
            token, key, algorithms=[ALGORITHM], issuer=ISSUER, options=_DECODE_OPTIONS
        )
    except Exception:
        # Anything the decoder dislikes about untrusted input (bad signature, expired,
        # other issuer, claims of the wrong type) is simply an invalid token.
        raise InvalidToken("token is invalid or expired") from None
    user_id = claims.get("sub")
    role = claims.get("role", "user")
    if not isinstance(user_id, str) or not user_id or not isinstance(role, str):
        raise InvalidToken("token claims are invalid")
    return Principal(user_id=user_id, role=role)


def parse_jwks(document: object) -> dict[str, Key]:
    """The usable RS256 signing keys of a JWKS document, by kid; others are skipped."""
    fields = json_object(document)
    entries = fields.get("keys") if fields is not None else None
    if not isinstance(entries, list):
        raise ValueError("JWKS document must be an object with a keys list")
    keys: dict[str, Key] = {}
    for item in entries:
        entry = json_object(item)
        kid = entry.get("kid") if entry is not None else None
        if entry is None or not isinstance(kid, str):
            continue
        try:
            keys[kid] = rsa_public_key(entry)
        except ValueError as exc:
            logger.warning("skipping JWKS key", extra={"kid": kid, "error": str(exc)})
    return keys


class JwksClient(HttpClient):
    """The auth service's public keys: fetched on first use, again once they are `ttl_s`
    old, and at once when a token names an unknown kid (a rotation).

    Fetches are single-flight and at most one per `min_refresh_interval` seconds, so a
    stream of tokens with made-up key ids cannot turn into a stream of requests to auth.
    When a refresh fails, the keys already held keep verifying until the next attempt.
    """

    def __init__(
        self,
        url: str,
        *,
        ttl_s: float = DEFAULT_JWKS_TTL_S,
        min_refresh_interval: float = DEFAULT_MIN_REFRESH_INTERVAL_S,
        fetch_timeout: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if urlsplit(url).scheme not in {"http", "https"}:
            raise ConfigError(f"AUTH_JWKS_URL must be an http(s) URL, got {url!r}")
        self.url = url
        self.fetches = 0
        self._ttl_s = ttl_s
        self._min_refresh_interval = min_refresh_interval
        self._fetch_timeout = fetch_timeout
        self._clock = clock
        self._keys: dict[str, Key] = {}
        self._fetched_at: float | None = None
        self._last_attempt: float | None = None
        self._last_failed = False
        self._lock = asyncio.Lock()

    @property
    def ttl_s(self) -> float:
        """Seconds fetched keys are kept before the next token fetches them again."""
        return self._ttl_s

    def open_session(self) -> aiohttp.ClientSession:
        """A session bounded by the fetch timeout; nothing is fetched until a token comes."""
        return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._fetch_timeout))

    async def verify(self, token: str) -> Principal:
        """Check a token; raises `InvalidToken`, or `KeysUnavailable` when auth is away."""
        if self._expired():
            # Stale keys still verify when the refresh fails: auth being briefly away
            # should not turn every valid token into a 503.
            with contextlib.suppress(KeysUnavailable):
                await self._refresh()
        try:
            return verify_jwt(token, self._keys)
        except UnknownKeyId:
            keys = await self._refresh()
            return verify_jwt(token, keys)

    def _expired(self) -> bool:
        """True when the keys held are older than the TTL and a fetch is allowed now.

        Nothing fetched yet is not expired: the first token with a kid fetches, so
        garbage tokens never cause a request.
        """
        if self._fetched_at is None or self._clock() - self._fetched_at < self._ttl_s:
            return False
        return not self._throttled()

    def _throttled(self) -> bool:
        return (
            self._last_attempt is not None
            and self._clock() - self._last_attempt < self._min_refresh_interval
        )

    async def _refresh(self) -> dict[str, Key]:
        attempt_seen = self._last_attempt
        async with self._lock:
            if self._last_attempt != attempt_seen:
                # Another request fetched while we waited; use what it got.
                return self._current_or_raise()
            if self._throttled():
                return self._current_or_raise()
            self._last_attempt = self._clock()
            try:
                self._keys = await self._fetch()
                self._fetched_at = self._last_attempt
                self._last_failed = False
                logger.info("fetched JWKS", extra={"url": self.url, "kids": sorted(self._keys)})
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                self._last_failed = True
                logger.warning("JWKS fetch failed", extra={"url": self.url, "error": str(exc)})
            return self._current_or_raise()

    def _current_or_raise(self) -> dict[str, Key]:
        if self._last_failed:
            raise KeysUnavailable("the auth service's keys could not be fetched")
        return self._keys

    async def _fetch(self) -> dict[str, Key]:
        self.fetches += 1
        async with self.session.get(self.url, allow_redirects=False) as resp:
            if resp.status != 200:
                raise ValueError(f"JWKS answered HTTP {resp.status}")
            body = await resp.content.read(MAX_JWKS_BYTES + 1)
        if len(body) > MAX_JWKS_BYTES:
            raise ValueError("JWKS document is too large")
        return parse_jwks(json.loads(body))


class ConnectTokenCheck:
    """Connect metadata interceptor: `unauthenticated` unless a valid bearer token comes.

    Placed first, it runs before the request body is read or parsed.
    """

    def __init__(self, verifier: TokenVerifier) -> None:
        self._verifier = verifier

    async def on_start(self, ctx: RequestContext[Any, Any]) -> contextvars.Token[Principal | None]:
        token = bearer_token(ctx.request_headers.get("authorization"))
        if token is None:
            raise ConnectError(Code.UNAUTHENTICATED, "missing bearer token")
        try:
            principal = await self._verifier.verify(token)
        except InvalidToken as exc:
            raise ConnectError(Code.UNAUTHENTICATED, str(exc)) from None
        except KeysUnavailable as exc:
            raise ConnectError(Code.UNAVAILABLE, str(exc)) from None
        return _current_principal.set(principal)

    async def on_end(
        self,
        token: contextvars.Token[Principal | None],
        ctx: RequestContext[Any, Any],
        error: Exception | None,
        /,
    ) -> None:
        with contextlib.suppress(ValueError):
            _current_principal.reset(token)


class GuardedRoute(BaseRoute):
    """A REST route that answers 401 JSON unless the request carries a valid bearer token."""

    def __init__(self, route: BaseRoute, verifier: TokenVerifier) -> None:
        self.route = route
        self._verifier = verifier

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        return self.route.matches(scope)

    def url_path_for(self, name: str, /, **path_params: Any) -> Any:
        return self.route.url_path_for(name, **path_params)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.route.handle(scope, receive, send)
            return
        token = bearer_token(Headers(scope=scope).get("authorization"))
        try:
            if token is None:
                raise InvalidToken("missing bearer token")
            principal = await self._verifier.verify(token)
        except InvalidToken as exc:
            response = json_error(401, str(exc), headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        except KeysUnavailable as exc:
            await json_error(503, str(exc))(scope, receive, send)
            return
        reset = _current_principal.set(principal)
        try:
            await self.route.handle(scope, receive, send)
        finally:
            _current_principal.reset(reset)


@dataclass(frozen=True)
class TokenCheck:
    """What a service that requires bearer tokens (`AUTH_REQUIRED=1`) composes into itself:
    a Connect interceptor, a guard for its REST routes, and the JWKS client they share (a
    resource to open for the service's life)."""

    keys: JwksClient

    @property
    def interceptor(self) -> ConnectTokenCheck:
        """Placed first among the interceptors: `unauthenticated` before the body is read."""
        return ConnectTokenCheck(self.keys)

    def guard(self, routes: Sequence[BaseRoute]) -> list[BaseRoute]:
        """`routes`, each answering 401 JSON unless a valid token comes."""
        return [GuardedRoute(route, self.keys) for route in routes]


def token_check(settings: CommonSettings) -> TokenCheck:
    """The token check a service's settings ask for; `ConfigError` without AUTH_JWKS_URL."""
    if not settings.auth_jwks_url:
        raise ConfigError("AUTH_REQUIRED=1 needs AUTH_JWKS_URL (the auth service's JWKS URL)")
    jwks = JwksClient(settings.auth_jwks_url, ttl_s=settings.auth_jwks_ttl_s)
    logger.info("bearer tokens required", extra={"jwks_url": jwks.url, "ttl_s": jwks.ttl_s})
    return TokenCheck(jwks)
