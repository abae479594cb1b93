"""The REST routes: register, login, verify (Traefik's forwardAuth target) and the JWKS."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from microapp.platform.authn import InvalidToken, bearer_token
from microapp.platform.rest import json_error, read_json_object, string_field
from microapp.services.auth.accounts import (
    Accounts,
    AccountsBusy,
    AccountsUnavailable,
    BadCredentials,
    EmailTaken,
    InvalidInput,
)
from microapp.services.auth.tokens import TokenIssuer

_UNAUTHORIZED_HEADERS = {"WWW-Authenticate": "Bearer"}
# Password hashing was saturated: a second later a slot is likely free.
_BUSY_HEADERS = {"Retry-After": "1"}


def auth_routes(accounts: Accounts, tokens: TokenIssuer, *, max_body_bytes: int) -> list[Route]:
    """`POST /auth/register`, `POST /auth/login`, `GET /verify`, `GET /.well-known/jwks.json`."""

    async def register(request: Request) -> Response:
        body = await read_json_object(request, limit=max_body_bytes)
        try:
            user = await accounts.register(
                string_field(body, "email"), string_field(body, "password")
            )
        except InvalidInput as exc:
            return json_error(400, str(exc))
        except EmailTaken as exc:
            return json_error(409, str(exc))
        except AccountsBusy as exc:
            return json_error(503, str(exc), headers=_BUSY_HEADERS)
        except AccountsUnavailable as exc:
            return json_error(503, str(exc))
        return JSONResponse({"id": user.id, "email": user.email, "role": user.role}, 201)

    async def login(request: Request) -> Response:
        body = await read_json_object(request, limit=max_body_bytes)
        try:
            token = await accounts.login(
                string_field(body, "email"), string_field(body, "password")
            )
        except InvalidInput as exc:
            return json_error(400, str(exc))
        except BadCredentials as exc:
            return json_error(401, str(exc), headers=_UNAUTHORIZED_HEADERS)
        except AccountsBusy as exc:
            return json_error(503, str(exc), headers=_BUSY_HEADERS)
        except AccountsUnavailable as exc:
            return json_error(503, str(exc))
        return JSONResponse({"token": token}, headers={"Cache-Control": "no-store"})

    async def verify(request: Request) -> Response:
        token = bearer_token(request.headers.get("authorization"))
        if token is None:
            return json_error(401, "missing bearer token", headers=_UNAUTHORIZED_HEADERS)
        try:
            principal = accounts.verify(token)
        except InvalidToken as exc:
            return json_error(401, str(exc), headers=_UNAUTHORIZED_HEADERS)
        return JSONResponse(
            {"ok": True, "userId": principal.user_id, "role": principal.role},
            headers={"X-User-Id": principal.user_id, "X-User-Role": principal.role},
        )

    async def jwks(request: Request) -> Response:
        return JSONResponse(tokens.jwks(), headers={"Cache-Control": "public, max-age=300"})

    return [
        Route("/auth/register", register, methods=["POST"]),
        Route("/auth/login", login, methods=["POST"]),
        Route("/verify", verify, methods=["GET"]),
        Route("/.well-known/jwks.json", jwks, methods=["GET"]),
    ]
