"""Builds the auth service: settings, signing key, accounts, REST routes and Connect service."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from argon2 import PasswordHasher
from pydantic import Field, field_validator
from pydantic_settings import NoDecode
from starlette.applications import Starlette

from microapp.gen.auth.v1 import auth_pb2
from microapp.gen.auth.v1.auth_connect import AuthServiceASGIApplication
from microapp.platform.config import CommonSettings, Settings, split_list, variable
from microapp.platform.db import Database
from microapp.platform.http import ConnectService, ServiceParts, build_app
from microapp.platform.idempotency import IdempotentCall
from microapp.services.auth.accounts import Accounts
from microapp.services.auth.keys import (
    SigningKey,
    load_key_file,
    load_or_create_dev_key,
    load_previous_public_keys,
)
from microapp.services.auth.passwords import (
    DEFAULT_HASH_CONCURRENCY,
    DEFAULT_HASH_QUEUE_TIMEOUT_S,
    Passwords,
)
from microapp.services.auth.routes import auth_routes
from microapp.services.auth.service import AuthHandler
from microapp.services.auth.tokens import DEFAULT_TOKEN_TTL_S, TokenIssuer

# Its SQL migrations (migrations/*.sql) ship in the service's own package.
MIGRATIONS_PACKAGE = "microapp.services.auth"

logger = logging.getLogger(__name__)

DEFAULT_DEV_KEY_DIR = ".microapp/auth"
# Registration creates a user: run once per Idempotency-Key, over Connect and REST. The
# password stays out of the stored request fingerprint, which is a fast hash.
IDEMPOTENT_CALLS = [
    IdempotentCall("/auth.v1.AuthService/Register", unfingerprinted=("password",)),
    IdempotentCall("POST /auth/register", unfingerprinted=("password",)),
]


class AuthSettings(Settings):
    """auth's own settings beside the common ones."""

    common: CommonSettings = Field(default_factory=CommonSettings)
    private_key_file: Path | None = variable("AUTH_PRIVATE_KEY_FILE", None)
    previous_public_key_files: Annotated[tuple[Path, ...], NoDecode] = variable(
        "AUTH_PREVIOUS_PUBLIC_KEY_FILES", ()
    )
    dev_key_dir: Path = variable("AUTH_DEV_KEY_DIR", Path(DEFAULT_DEV_KEY_DIR))
    token_ttl_s: int = variable("AUTH_TOKEN_TTL_S", DEFAULT_TOKEN_TTL_S, ge=1)
    dev_mode: bool = variable("AUTH_DEV_MODE", False)
    hash_concurrency: int = variable("AUTH_HASH_CONCURRENCY", DEFAULT_HASH_CONCURRENCY, ge=1)
    hash_queue_timeout_s: float = variable(
        "AUTH_HASH_QUEUE_TIMEOUT_S", DEFAULT_HASH_QUEUE_TIMEOUT_S, ge=0.0
    )

    _split = field_validator("previous_public_key_files", mode="before")(split_list)


def signing_key(settings: AuthSettings) -> SigningKey:
    """The key file's key, or the development key (generated on first start)."""
    if settings.private_key_file is not None:
        return load_key_file(settings.private_key_file)
    key = load_or_create_dev_key(settings.dev_key_dir)
    logger.warning(
        "using a development signing key; set AUTH_PRIVATE_KEY_FILE in production",
        extra={"path": str(settings.dev_key_dir.resolve())},
    )
    return key


def _warn_about_the_user_store(
    settings: AuthSettings, database: Database | None, accounts: Accounts
) -> None:
    if accounts.development_mode:
        logger.warning(
            "DEVELOPMENT MODE (AUTH_DEV_MODE=1, no DATABASE_URL): registration is refused and "
            "ANY email logs in without a password check; never run auth like this in production"
        )
    elif database is None:
        logger.warning(
            "no DATABASE_URL: register and login answer 503; set DATABASE_URL, or "
            "AUTH_DEV_MODE=1 for development logins without a password check"
        )
    elif settings.dev_mode:
        logger.warning("AUTH_DEV_MODE is ignored: DATABASE_URL is set, so passwords are checked")


@asynccontextmanager
async def hashing(passwords: Passwords) -> AsyncGenerator[Passwords, None]:
    """The hashing pool for the service's life: its dummy hash made at startup (so the first
    unknown-email login costs no extra hash), the pool stopped at shutdown."""
    await passwords.start()
    try:
        yield passwords
    finally:
        await passwords.close()


def create_app(
    settings: AuthSettings,
    *,
    database: Database | None = None,
    hasher: PasswordHasher | None = None,
) -> Starlette:
    """The auth service as an ASGI app.


    `database` is the platform's (None without DATABASE_URL); `hasher` defaults to a
    real one; tests may pass their own at this seam.
    """
    common = settings.common
    if common.auth_required:
        # Register, login and the JWKS are how callers get tokens in the first place.
        logger.warning("AUTH_REQUIRED is ignored by the auth service itself")
        common = common.model_copy(update={"auth_required": False})
    tokens = TokenIssuer(
        signing_key(settings),
        previous_public_jwks=load_previous_public_keys(settings.previous_public_key_files),
        ttl_s=settings.token_ttl_s,
    )
    passwords = Passwords(
        hasher,
        concurrency=settings.hash_concurrency,
        queue_timeout_s=settings.hash_queue_timeout_s,
    )
    accounts = Accounts(database, passwords, tokens, dev_mode=settings.dev_mode)
    _warn_about_the_user_store(settings, database, accounts)
    return build_app(
        common,
        ServiceParts(
            connect=[ConnectService(AuthServiceASGIApplication, AuthHandler(accounts))],
            proto_files=[auth_pb2.DESCRIPTOR],
            routes=auth_routes(accounts, tokens, max_body_bytes=common.max_body_bytes),
            database=database,
            resources=[hashing(passwords)],
            idempotent=IDEMPOTENT_CALLS,
        ),
    )
