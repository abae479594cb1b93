"""User accounts: registration, login and token checks, free of HTTP and Connect details."""

from __future__ import annotations

import logging
import re
import unicodedata
import uuid
from dataclasses import dataclass

import psycopg

from microapp.platform.authn import Principal
from microapp.platform.db import Database, DatabaseUnavailable
from microapp.services.auth.passwords import Passwords, PasswordsBusy
from microapp.services.auth.tokens import TokenIssuer

logger = logging.getLogger(__name__)

MAX_EMAIL_LENGTH = 255
MIN_PASSWORD_LENGTH = 8
# argon2 takes any length, but nobody types a longer password and hashing a huge one is
# work an anonymous caller should not be able to order.
MAX_PASSWORD_LENGTH = 1024
DEFAULT_ROLE = "user"
_EMAIL = re.compile(r"^[^@\s]+@[^@\s.][^@\s]*\.[^@\s.]+$")
# Development tokens (no database) name a stable user id per email.
_DEV_NAMESPACE = uuid.UUID("6f1c2a8e-4d0b-5b7e-9a53-2d7f0c9e1b44")

INSERT_USER = """
INSERT INTO users (email, password_hash) VALUES (%s, %s)
ON CONFLICT (email) DO NOTHING
RETURNING id, email, role
"""
SELECT_USER = "SELECT id, password_hash, role FROM users WHERE email = %s"
UPDATE_HASH = "UPDATE users SET password_hash = %s, updated_at = now() WHERE id = %s"


class InvalidInput(ValueError):
    """The email is not an address or the password is not acceptable."""


class EmailTaken(Exception):
    """An account with this email exists already."""


class BadCredentials(Exception):
    """Unknown email or wrong password; deliberately the same error for both."""


class AccountsUnavailable(Exception):
    """The user store is not configured or not reachable."""


class AccountsBusy(AccountsUnavailable):
    """Too many password checks are running; the caller should retry shortly."""


@dataclass(frozen=True)
class User:
    """A registered account as clients see it."""

    id: str
    email: str
    role: str


def normalize_email(email: str) -> str:
    """Emails compare without surrounding blanks and case: `Ada@X.org` is `ada@x.org`."""
    return email.strip().lower()


def check_email_characters(email: str) -> None:
    """Raise `InvalidInput` when `email` holds a control character (NUL, newline, DEL, C1).

    Checked on the raw input, before any normalization strips blanks, and before the
    database: PostgreSQL refuses NUL in text, and no address contains such characters.
    """
    if any(unicodedata.category(char) == "Cc" for char in email):
        raise InvalidInput("email must not contain control characters")


def validate_registration(email: str, password: str) -> None:
    """Raise `InvalidInput` unless `email` is an address and `password` is long enough."""
    if len(email) > MAX_EMAIL_LENGTH or not _EMAIL.match(email):
        raise InvalidInput("email must be an email address")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InvalidInput(f"password must be at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise InvalidInput(f"password must be at most {MAX_PASSWORD_LENGTH} characters")


class Accounts:
    """Registers users, checks their passwords and issues and verifies their tokens.

    Without a database, registration and login are refused, unless `dev_mode` is set:
    then any well-formed email logs in (development only).
    """

    def __init__(
        self,
        database: Database | None,
        passwords: Passwords,
        tokens: TokenIssuer,
        *,
        dev_mode: bool = False,
    ) -> None:
        self._database = database
        self._passwords = passwords
        self._tokens = tokens
        self._dev_mode = dev_mode

    @property
    def development_mode(self) -> bool:
        """True when there is no user store and development mode lets any email log in."""
        return self._database is None and self._dev_mode

    async def register(self, email: str, password: str) -> User:
        """Create an account with role `user`."""
        check_email_characters(email)
        email = normalize_email(email)
        validate_registration(email, password)
        database = self._require_database()
        password_hash = await self._hash(password)
        try:
            async with database.connection() as conn:
                cursor = await conn.execute(INSERT_USER, (email, password_hash))
                row = await cursor.fetchone()
        except DatabaseUnavailable as exc:
            raise AccountsUnavailable("the user store is unavailable") from exc
        if row is None:
            raise EmailTaken("an account with this email exists")
        return User(id=str(row[0]), email=row[1], role=row[2])

    async def login(self, email: str, password: str) -> str:
        """A token for valid credentials; `BadCredentials` otherwise."""
        check_email_characters(email)
        email = normalize_email(email)
        if self.development_mode:
            return self._development_login(email)
        database = self._require_database()
        try:
            async with database.connection() as conn:
                cursor = await conn.execute(SELECT_USER, (email,))
                row = await cursor.fetchone()
        except DatabaseUnavailable as exc:
            raise AccountsUnavailable("the user store is unavailable") from exc
        # An unknown email is checked against a dummy hash: the same argon2 work as a
        # wrong password, so the answer's timing does not tell whether the email exists.
        stored_hash = row[1] if row else None
        try:
            matches = await self._passwords.check(stored_hash, password)
        except PasswordsBusy as exc:
            raise AccountsBusy(str(exc)) from None
        if not matches or row is None:
            raise BadCredentials("invalid email or password")
        user_id, role = str(row[0]), row[2]
        if self._passwords.needs_rehash(row[1]):
            await self._rehash(database, user_id, password)
        return self._tokens.issue(user_id, role)

    def verify(self, token: str) -> Principal:
        """The token's principal; raises `InvalidToken`."""
        return self._tokens.verify(token)

    def _development_login(self, email: str) -> str:
        if len(email) > MAX_EMAIL_LENGTH or not _EMAIL.match(email):
            raise BadCredentials("invalid email or password")
        return self._tokens.issue(str(uuid.uuid5(_DEV_NAMESPACE, email)), DEFAULT_ROLE)

    async def _hash(self, password: str) -> str:
        try:
            return await self._passwords.hash(password)
        except PasswordsBusy as exc:
            raise AccountsBusy(str(exc)) from None

    def _require_database(self) -> Database:
        if self._database is None:
            raise AccountsUnavailable("accounts need a database (DATABASE_URL is not set)")
        if not self._database.ready:
            raise AccountsUnavailable("the user store is unavailable")
        return self._database

    async def _rehash(self, database: Database, user_id: str, password: str) -> None:
        # The hashing parameters changed since this password was stored: upgrade it now
        # that we know the password. A failure only postpones it to the next login.
        try:
            new_hash = await self._passwords.hash(password)
            await database.execute(UPDATE_HASH, (new_hash, user_id))
        except (DatabaseUnavailable, psycopg.Error, PasswordsBusy) as exc:
            logger.warning("password rehash failed", extra={"error": str(exc)})
