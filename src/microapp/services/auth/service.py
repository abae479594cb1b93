"""auth.v1.AuthService: the Connect face of the accounts, beside the REST routes."""

from __future__ import annotations

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext

from microapp.gen.auth.v1.auth_connect import AuthService
from microapp.gen.auth.v1.auth_pb2 import (
    LoginRequest,
    LoginResponse,
    RegisterRequest,
    RegisterResponse,
    VerifyRequest,
    VerifyResponse,
)
from microapp.platform.authn import InvalidToken
from microapp.services.auth.accounts import (
    Accounts,
    AccountsUnavailable,
    BadCredentials,
    EmailTaken,
    InvalidInput,
)


class AuthHandler(AuthService):
    """Implements the generated `AuthService` protocol.

    Saturated password hashing is `unavailable` like a database outage: the same call
    is likely to succeed when retried a moment later.
    """

    def __init__(self, accounts: Accounts) -> None:
        self._accounts = accounts

    async def register(
        self, request: RegisterRequest, ctx: RequestContext[RegisterRequest, RegisterResponse]
    ) -> RegisterResponse:
        try:
            user = await self._accounts.register(request.email, request.password)
        except InvalidInput as exc:
            raise ConnectError(Code.INVALID_ARGUMENT, str(exc)) from None
        except EmailTaken as exc:
            raise ConnectError(Code.ALREADY_EXISTS, str(exc)) from None
        except AccountsUnavailable as exc:
            raise ConnectError(Code.UNAVAILABLE, str(exc)) from None
        return RegisterResponse(id=user.id, email=user.email, role=user.role)

    async def login(
        self, request: LoginRequest, ctx: RequestContext[LoginRequest, LoginResponse]
    ) -> LoginResponse:
        try:
            token = await self._accounts.login(request.email, request.password)
        except InvalidInput as exc:
            raise ConnectError(Code.INVALID_ARGUMENT, str(exc)) from None
        except BadCredentials as exc:
            raise ConnectError(Code.UNAUTHENTICATED, str(exc)) from None
        except AccountsUnavailable as exc:
            raise ConnectError(Code.UNAVAILABLE, str(exc)) from None
        return LoginResponse(token=token)

    async def verify(
        self, request: VerifyRequest, ctx: RequestContext[VerifyRequest, VerifyResponse]
    ) -> VerifyResponse:
        try:
            principal = self._accounts.verify(request.token)
        except InvalidToken as exc:
            raise ConnectError(Code.UNAUTHENTICATED, str(exc)) from None
        return VerifyResponse(user_id=principal.user_id, role=principal.role)
