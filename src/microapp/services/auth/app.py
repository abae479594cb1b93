"""Builds the auth service: settings, signing key, accounts, REST routes and Connect service."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher
from starlette.applications import Starlette

from microapp.gen.auth.v1 import auth_pb2
from microapp.gen.auth.v1.auth_connect import AuthServiceASGIApplication
from microapp.platform.config import (
    CommonSettings,
    env_bool,
    env_float,
    env_int,
    env_list,
    env_str,
)
from microapp.platform.db import Database
from microapp.platform.http import ConnectService, ServiceParts, build_app
from microapp.platform.idempotency import IdempotentCall
from microapp.platform.migrations import load_migrations
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

logger = logging.getLogger(__name__)

MIGRATIONS_PACKAGE = "microapp.services.auth"
DEFAULT_DEV_KEY_DIR = ".microapp/auth"
# Registration creates a user: run once per Idempotency-Key, over Connect and REST. The
# password stays out of the stored request fingerprint, which is a fast hash.
IDEMPOTENT_CALLS = [
    IdempotentCall("/auth.v1.AuthService/Register", unfingerprinted=("password",)),
    IdempotentCall("POST /auth/register", unfingerprinted=("password",)),
]


@dataclass(frozen=True)
class AuthSettings:
    """auth's own settings beside the common ones."""

    common: CommonSettings
    private_key_file: Path | None = None
    previous_public_key_files: tuple[Path, ...] = ()
    dev_key_dir: Path = Path(DEFAULT_DEV_KEY_DIR)
    token_ttl_s: int = DEFAULT_TOKEN_TTL_S
    dev_mode: bool = False
    hash_concurrency: int = DEFAULT_HASH_CONCURRENCY
    hash_queue_timeout_s: float = DEFAULT_HASH_QUEUE_TIMEOUT_S

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AuthSettings:
        """Read `AUTH_PRIVATE_KEY_FILE`, `AUTH_DEV_MODE`, `AUTH_HASH_CONCURRENCY` and the rest."""
        env = os.environ if env is None else env
        key_file = env_str(env, "AUTH_PRIVATE_KEY_FILE", "")
        return cls(
            common=CommonSettings.from_env(
                "auth", default_port=8090, default_otel_name="auth-service", env=env
            ),
            private_key_file=Path(key_file) if key_file else None,
            previous_public_key_files=tuple(
                Path(p) for p in env_list(env, "AUTH_PREVIOUS_PUBLIC_KEY_FILES")
            ),
            dev_key_dir=Path(env_str(env, "AUTH_DEV_KEY_DIR", DEFAULT_DEV_KEY_DIR)),
            token_ttl_s=env_int(env, "AUTH_TOKEN_TTL_S", DEFAULT_TOKEN_TTL_S, minimum=1),
            dev_mode=env_bool(env, "AUTH_DEV_MODE", False),
            hash_concurrency=env_int(
                env, "AUTH_HASH_CONCURRENCY", DEFAULT_HASH_CONCURRENCY, minimum=1
            ),
            hash_queue_timeout_s=env_float(
                env, "AUTH_HASH_QUEUE_TIMEOUT_S", DEFAULT_HASH_QUEUE_TIMEOUT_S
            ),
        )


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


def create_app(
    settings: AuthSettings,
    *,
    database: Database | None = None,
    hasher: PasswordHasher | None = None,
) -> Starlette:
    """The auth service as an ASGI app.

    `database` and `hasher` default to real ones built from the settings; tests may pass
    their own at this seam.
    """
    common = settings.common
    if common.auth_required:
        # Register, login and the JWKS are how callers get tokens in the first place.
        logger.warning("AUTH_REQUIRED is ignored by the auth service itself")
        common = dataclasses.replace(common, auth_required=False)
    if database is None and common.database_url:
        database = Database(common.database_url, load_migrations(MIGRATIONS_PACKAGE))
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
            components=[passwords],
            idempotent=IDEMPOTENT_CALLS,
        ),
    )
