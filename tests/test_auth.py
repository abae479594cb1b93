"""The auth service end to end: a real `microapp serve auth` process and real PostgreSQL."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import stat
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt as pyjwt
import pytest
from argon2 import PasswordHasher
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from microapp.gen.auth.v1.auth_connect import AuthServiceClient
from microapp.gen.auth.v1.auth_pb2 import LoginRequest, RegisterRequest, VerifyRequest
from microapp.platform.db import Database
from microapp.platform.migrations import load_migrations
from microapp.services.auth.accounts import Accounts, BadCredentials
from microapp.services.auth.app import MIGRATIONS_PACKAGE
from microapp.services.auth.keys import SigningKey
from microapp.services.auth.passwords import Passwords
from microapp.services.auth.tokens import TokenIssuer
from tests.support.commands import run
from tests.support.jwt import TestKey, b64url
from tests.support.ports import free_port
from tests.support.postgres import TestPostgres, query
from tests.support.services import ServiceProcess

PASSWORD = "correct horse battery"


@dataclass
class Auth:
    service: ServiceProcess
    database_url: str
    key: TestKey


def _segment(value: dict[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def _unique_email() -> str:
    return f"user-{uuid.uuid4().hex[:12]}@example.org"


@pytest.fixture(scope="module")
def test_key(tmp_path_factory: pytest.TempPathFactory) -> TestKey:
    return TestKey.new(tmp_path_factory.mktemp("auth-key") / "auth-key.pem")


@pytest.fixture(scope="module")
async def auth(postgres: TestPostgres, test_key: TestKey) -> AsyncIterator[Auth]:
    database_url = postgres.fresh_database("auth")
    env = {"DATABASE_URL": database_url, "AUTH_PRIVATE_KEY_FILE": str(test_key.path)}
    async with ServiceProcess("auth", env) as service:
        await service.wait_for("/healthz", 200)
        yield Auth(service, database_url, test_key)


async def _request(
    method: str, url: str, *, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any, Mapping[str, str]]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, json=body, headers=headers) as resp,
    ):
        payload = await resp.json(content_type=None)
        return resp.status, payload, resp.headers.copy()


async def _register(auth: Auth, email: str, password: str = PASSWORD) -> tuple[int, Any]:
    status, body, _ = await _request(
        "POST", auth.service.url + "/auth/register", body={"email": email, "password": password}
    )
    return status, body


async def _login(auth: Auth, email: str, password: str = PASSWORD) -> tuple[int, Any]:
    status, body, _ = await _request(
        "POST", auth.service.url + "/auth/login", body={"email": email, "password": password}
    )
    return status, body


async def _verify(base_url: str, authorization: str | None) -> tuple[int, Any, Mapping[str, str]]:
    headers = {"Authorization": authorization} if authorization is not None else {}
    return await _request("GET", base_url + "/verify", headers=headers)


async def _token_for_new_user(auth: Auth) -> tuple[str, str]:
    email = _unique_email()
    status, user = await _register(auth, email)
    assert status == 201, user
    status, body = await _login(auth, email)
    assert status == 200, body
    return user["id"], body["token"]


# --- register, login, verify -------------------------------------------------------------


async def test_register_login_verify_round_trip(auth: Auth) -> None:
    email = _unique_email()
    status, user = await _register(auth, email)
    assert status == 201
    assert user["email"] == email and user["role"] == "user"
    assert uuid.UUID(user["id"])

    status, body = await _login(auth, email)
    assert status == 200
    token = body["token"]

    status, verified, headers = await _verify(auth.service.url, f"Bearer {token}")
    assert status == 200
    assert verified["ok"] is True
    assert verified["userId"] == user["id"]
    assert headers["X-User-Id"] == user["id"]


async def test_token_verifies_with_pyjwt_using_only_the_jwks_document(auth: Auth) -> None:
    user_id, token = await _token_for_new_user(auth)
    status, jwks, _ = await _request("GET", auth.service.url + "/.well-known/jwks.json")
    assert status == 200

    key = pyjwt.PyJWKSet.from_dict(jwks)[pyjwt.get_unverified_header(token)["kid"]]
    claims = pyjwt.decode(
        token,
        key.key,
        algorithms=["RS256"],
        issuer="auth-service",
        options={"require": ["sub", "role", "iss", "iat", "exp"]},
    )
    assert claims["sub"] == user_id
    assert claims["role"] == "user"
    assert claims["exp"] - claims["iat"] == 24 * 3600


async def test_jwks_publishes_the_key_file_public_key_under_its_thumbprint(auth: Auth) -> None:
    status, jwks, _ = await _request("GET", auth.service.url + "/.well-known/jwks.json")
    assert status == 200
    [published] = jwks["keys"]
    assert {k: published[k] for k in ("kty", "use", "alg", "kid")} == {
        "kty": "RSA",
        "use": "sig",
        "alg": "RS256",
        "kid": auth.key.kid,
    }
    numbers = auth.key.private.public_key().public_numbers()
    public = pyjwt.algorithms.RSAAlgorithm.from_jwk(published).public_numbers()
    assert (public.n, public.e) == (numbers.n, numbers.e)
    assert "d" not in published


async def test_token_header_names_the_key_id(auth: Auth) -> None:
    _, token = await _token_for_new_user(auth)
    assert pyjwt.get_unverified_header(token) == {"alg": "RS256", "kid": auth.key.kid, "typ": "JWT"}


async def test_token_signed_by_the_service_key_with_valid_claims_verifies(auth: Auth) -> None:
    # The control for the rejections below: a token the test signs itself is accepted
    # when nothing is wrong with it.
    user_id = str(uuid.uuid4())
    status, body, _ = await _verify(auth.service.url, f"Bearer {auth.key.sign(sub=user_id)}")
    assert status == 200
    assert body["userId"] == user_id


def _tampered(auth: Auth, token: str) -> str:
    header, _, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    claims["role"] = "admin"
    return f"{header}.{_segment(claims)}.{signature}"


def _alg_none(auth: Auth, token: str) -> str:
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    return f"{_segment({'alg': 'none', 'kid': auth.key.kid, 'typ': 'JWT'})}.{_segment(claims)}."


def _hs256_with_public_key(auth: Auth, token: str) -> str:
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    signing_input = (
        f"{_segment({'alg': 'HS256', 'kid': auth.key.kid, 'typ': 'JWT'})}.{_segment(claims)}"
    )
    mac = hmac.new(auth.key.public_pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


REJECTED: dict[str, Callable[[Auth, str], str | None]] = {
    "no token": lambda auth, token: None,
    "garbage": lambda auth, token: "Bearer not-a-jwt",
    "garbage in three parts": lambda auth, token: "Bearer abc.def.ghi",
    "not a bearer token": lambda auth, token: f"Basic {token}",
    "expired": lambda auth, token: (
        "Bearer " + auth.key.sign(iat=int(time.time()) - 7200, exp=int(time.time()) - 3600)
    ),
    "wrong issuer": lambda auth, token: "Bearer " + auth.key.sign(iss="someone-else"),
    "no issuer": lambda auth, token: "Bearer " + auth.key.sign(iss=None),
    "unknown kid": lambda auth, token: "Bearer " + auth.key.sign(kid="not-a-known-kid"),
    "tampered payload": lambda auth, token: "Bearer " + _tampered(auth, token),
    "alg none": lambda auth, token: "Bearer " + _alg_none(auth, token),
    "hs256 signed with the public key": lambda auth, token: (
        "Bearer " + _hs256_with_public_key(auth, token)
    ),
}


@pytest.mark.parametrize("case", list(REJECTED))
async def test_verify_rejects_with_401(auth: Auth, case: str) -> None:
    _, token = await _token_for_new_user(auth)
    status, body, headers = await _verify(auth.service.url, REJECTED[case](auth, token))
    assert status == 401
    assert "error" in body
    assert "X-User-Id" not in headers


@pytest.mark.parametrize(
    "case", [c for c in REJECTED if c not in {"no token", "not a bearer token"}]
)
async def test_connect_verify_rejects_as_unauthenticated(auth: Auth, case: str) -> None:
    _, token = await _token_for_new_user(auth)
    authorization = REJECTED[case](auth, token)
    assert authorization is not None
    async with AuthServiceClient(auth.service.url) as client:
        with pytest.raises(ConnectError) as caught:
            await client.verify(VerifyRequest(token=authorization.removeprefix("Bearer ")))
    assert caught.value.code == Code.UNAUTHENTICATED


@pytest.mark.parametrize(
    "email",
    ["", "not-an-email", "no-domain@", "@example.org", "a@b", "two words@example.org",
     "x" * 250 + "@example.org"],
)  # fmt: skip
async def test_register_refuses_a_bad_email_with_400(auth: Auth, email: str) -> None:
    status, body = await _register(auth, email)
    assert status == 400
    assert "email" in body["error"]


async def test_register_refuses_a_password_of_seven_characters_with_400(auth: Auth) -> None:
    status, body = await _register(auth, _unique_email(), "1234567")
    assert status == 400
    assert "password" in body["error"]


async def test_register_accepts_a_password_of_eight_characters(auth: Auth) -> None:
    status, _ = await _register(auth, _unique_email(), "12345678")
    assert status == 201


async def test_register_refuses_a_duplicate_email_with_409(auth: Auth) -> None:
    email = _unique_email()
    assert (await _register(auth, email))[0] == 201
    status, body = await _register(auth, email.upper(), "another password")
    assert status == 409
    assert "error" in body


async def test_login_with_a_wrong_password_is_401(auth: Auth) -> None:
    email = _unique_email()
    assert (await _register(auth, email))[0] == 201
    status, body = await _login(auth, email, "wrong password")
    assert status == 401
    assert "token" not in body


async def test_login_with_an_unknown_email_is_401_like_a_wrong_password(auth: Auth) -> None:
    email = _unique_email()
    assert (await _register(auth, email))[0] == 201
    wrong_password = await _login(auth, email, "wrong password")
    unknown_email = await _login(auth, _unique_email())
    assert unknown_email[0] == 401
    assert unknown_email == wrong_password


async def test_login_ignores_the_case_of_the_email(auth: Auth) -> None:
    email = _unique_email()
    assert (await _register(auth, email))[0] == 201
    status, _ = await _login(auth, "  " + email.upper())
    assert status == 200


async def test_login_with_malformed_json_is_400(auth: Auth) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            auth.service.url + "/auth/login",
            data=b'{"email": ',
            headers={"content-type": "application/json"},
        ) as resp,
    ):
        assert resp.status == 400
        assert "error" in await resp.json()


async def test_stored_hash_is_argon2id_and_never_the_password(auth: Auth) -> None:
    email = _unique_email()
    assert (await _register(auth, email))[0] == 201
    [(stored,)] = query(
        auth.database_url, "SELECT password_hash FROM users WHERE email = %s", (email,)
    )
    assert stored.startswith("$argon2id$")
    assert PASSWORD not in stored
    assert PasswordHasher().verify(stored, PASSWORD)


async def test_users_rows_have_the_default_role_and_timestamps(auth: Auth) -> None:
    email = _unique_email()
    assert (await _register(auth, email))[0] == 201
    [(role, created, updated)] = query(
        auth.database_url,
        "SELECT role, created_at, updated_at FROM users WHERE email = %s",
        (email,),
    )
    assert role == "user"
    assert created is not None and updated is not None


# --- Connect ---------------------------------------------------------------------------------


async def test_connect_register_login_verify_round_trip(auth: Auth) -> None:
    email = _unique_email()
    async with AuthServiceClient(auth.service.url) as client:
        user = await client.register(RegisterRequest(email=email, password=PASSWORD))
        login = await client.login(LoginRequest(email=email, password=PASSWORD))
        verified = await client.verify(VerifyRequest(token=login.token))
    assert (user.email, user.role) == (email, "user")
    assert (verified.user_id, verified.role) == (user.id, "user")


@pytest.mark.parametrize(
    ("email", "password", "code"),
    [
        ("not-an-email", PASSWORD, Code.INVALID_ARGUMENT),
        (None, "short", Code.INVALID_ARGUMENT),
    ],
)
async def test_connect_register_refuses_bad_input_as_invalid_argument(
    auth: Auth, email: str | None, password: str, code: Code
) -> None:
    async with AuthServiceClient(auth.service.url) as client:
        with pytest.raises(ConnectError) as caught:
            await client.register(
                RegisterRequest(email=email or _unique_email(), password=password)
            )
    assert caught.value.code == code


async def test_connect_register_of_a_duplicate_is_already_exists(auth: Auth) -> None:
    email = _unique_email()
    async with AuthServiceClient(auth.service.url) as client:
        await client.register(RegisterRequest(email=email, password=PASSWORD))
        with pytest.raises(ConnectError) as caught:
            await client.register(RegisterRequest(email=email, password=PASSWORD))
    assert caught.value.code == Code.ALREADY_EXISTS


async def test_connect_login_with_a_wrong_password_is_unauthenticated(auth: Auth) -> None:
    email = _unique_email()
    async with AuthServiceClient(auth.service.url) as client:
        await client.register(RegisterRequest(email=email, password=PASSWORD))
        with pytest.raises(ConnectError) as caught:
            await client.login(LoginRequest(email=email, password="wrong password"))
    assert caught.value.code == Code.UNAUTHENTICATED


# --- keys and restarts -----------------------------------------------------------------------


async def test_token_still_verifies_after_a_restart_with_the_same_key_file(
    postgres: TestPostgres, tmp_path: Path
) -> None:
    key = TestKey.new(tmp_path / "key.pem")
    env = {
        "DATABASE_URL": postgres.fresh_database("auth_restart"),
        "AUTH_PRIVATE_KEY_FILE": str(key.path),
    }
    email = _unique_email()
    async with ServiceProcess("auth", env) as first:
        await first.wait_for("/healthz", 200)
        auth = Auth(first, env["DATABASE_URL"], key)
        assert (await _register(auth, email))[0] == 201
        token = (await _login(auth, email))[1]["token"]

    async with ServiceProcess("auth", env) as second:
        status, body, _ = await _verify(second.url, f"Bearer {token}")
    assert status == 200
    assert body["ok"] is True


async def test_token_still_verifies_after_a_restart_with_the_same_dev_key_dir(
    tmp_path: Path,
) -> None:
    env = {"AUTH_DEV_KEY_DIR": str(tmp_path / "keys"), "AUTH_DEV_MODE": "1"}
    async with ServiceProcess("auth", env) as first:
        status, body, _ = await _request(
            "POST", first.url + "/auth/login", body={"email": "dev@example.org", "password": "x"}
        )
        assert status == 200
        token = body["token"]

    async with ServiceProcess("auth", env) as second:
        status, _, _ = await _verify(second.url, f"Bearer {token}")
    assert status == 200


async def test_dev_key_is_generated_once_and_readable_only_by_its_owner(tmp_path: Path) -> None:
    key_dir = tmp_path / "keys"
    async with ServiceProcess("auth", {"AUTH_DEV_KEY_DIR": str(key_dir)}):
        pass
    [key_file] = key_dir.iterdir()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    first = key_file.read_bytes()
    async with ServiceProcess("auth", {"AUTH_DEV_KEY_DIR": str(key_dir)}):
        pass
    assert key_file.read_bytes() == first


async def test_token_of_another_key_is_refused(auth: Auth, tmp_path: Path) -> None:
    other = TestKey.new(tmp_path / "other.pem")
    # Signed by a key the service does not hold but naming the service's kid.
    forged = pyjwt.encode(
        {"sub": "x", "role": "admin", "iss": "auth-service", "iat": int(time.time()),
         "exp": int(time.time()) + 60},
        other.private_pem, algorithm="RS256", headers={"kid": auth.key.kid},
    )  # fmt: skip
    status, _, _ = await _verify(auth.service.url, f"Bearer {forged}")
    assert status == 401


async def test_unreadable_key_file_stops_the_service_with_a_clear_message(tmp_path: Path) -> None:
    service = ServiceProcess("auth", {"AUTH_PRIVATE_KEY_FILE": str(tmp_path / "missing.pem")})
    with pytest.raises(RuntimeError, match="exited early"):
        await service.start(timeout=30)
    assert service.process is not None
    assert await service.process.wait() == 2
    assert "AUTH_PRIVATE_KEY_FILE" in service.logs()


# --- without a database, in development mode (AUTH_DEV_MODE=1) --------------------------------


@pytest.fixture(scope="module")
async def dev_auth(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ServiceProcess]:
    env = {"AUTH_DEV_KEY_DIR": str(tmp_path_factory.mktemp("dev-keys")), "AUTH_DEV_MODE": "1"}
    async with ServiceProcess("auth", env) as service:
        yield service


async def test_without_a_database_register_is_503(dev_auth: ServiceProcess) -> None:
    status, body, _ = await _request(
        "POST",
        dev_auth.url + "/auth/register",
        body={"email": "a@example.org", "password": PASSWORD},
    )
    assert status == 503
    assert "database" in body["error"]


async def test_in_development_mode_any_email_logs_in(dev_auth: ServiceProcess) -> None:
    status, body, _ = await _request(
        "POST", dev_auth.url + "/auth/login", body={"email": "anyone@example.org", "password": ""}
    )
    assert status == 200
    status, verified, _ = await _verify(dev_auth.url, f"Bearer {body['token']}")
    assert status == 200
    assert uuid.UUID(verified["userId"])


async def test_in_development_mode_the_startup_log_warns_of_it(
    dev_auth: ServiceProcess,
) -> None:
    warnings = [
        json.loads(line) for line in dev_auth.logs().splitlines() if "DEVELOPMENT MODE" in line
    ]
    assert warnings and warnings[0]["level"] == "WARNING"


# --- the accounts, in process ------------------------------------------------------------------


class CountingHasher(PasswordHasher):
    """argon2's own hasher, counting its verifications."""

    def __init__(self) -> None:
        super().__init__()
        self.verifications = 0

    def verify(self, hash: str | bytes, password: str | bytes) -> bool:
        self.verifications += 1
        return super().verify(hash, password)


@dataclass
class AccountsParts:
    database: Database
    database_url: str
    issuer: TokenIssuer


@pytest.fixture
async def accounts_parts(postgres: TestPostgres, test_key: TestKey) -> AsyncIterator[AccountsParts]:
    url = postgres.fresh_database("auth_acc")
    database = Database(url, load_migrations(MIGRATIONS_PACKAGE))
    await database.start()
    try:
        await database.wait_ready()
        issuer = TokenIssuer(SigningKey.from_pem(test_key.private_pem, source="test"))
        yield AccountsParts(database, url, issuer)
    finally:
        await database.close()


async def test_unknown_email_costs_one_password_check_like_a_wrong_password(
    accounts_parts: AccountsParts,
) -> None:
    hasher = CountingHasher()
    passwords = Passwords(hasher)
    await passwords.start()
    accounts = Accounts(accounts_parts.database, passwords, accounts_parts.issuer)
    await accounts.register("known@example.org", PASSWORD)

    hasher.verifications = 0
    with pytest.raises(BadCredentials):
        await accounts.login("known@example.org", "wrong password")
    assert hasher.verifications == 1

    hasher.verifications = 0
    with pytest.raises(BadCredentials):
        await accounts.login("unknown@example.org", PASSWORD)
    assert hasher.verifications == 1


async def test_login_upgrades_a_hash_made_with_older_parameters(
    accounts_parts: AccountsParts,
) -> None:
    old = Passwords(PasswordHasher(time_cost=1, memory_cost=8 * 1024))
    await Accounts(accounts_parts.database, old, accounts_parts.issuer).register(
        "old@example.org", PASSWORD
    )
    current = Accounts(accounts_parts.database, Passwords(), accounts_parts.issuer)
    await current.login("old@example.org", PASSWORD)

    [(stored,)] = query(
        accounts_parts.database_url,
        "SELECT password_hash FROM users WHERE email = %s",
        ("old@example.org",),
    )
    assert stored.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    assert await Passwords().check(stored, PASSWORD)


async def test_register_and_login_answer_503_while_the_database_is_down(tmp_path: Path) -> None:
    env = {
        "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/auth_db",
        "AUTH_DEV_KEY_DIR": str(tmp_path),
    }
    async with ServiceProcess("auth", env) as service:
        credentials = {"email": "a@example.org", "password": PASSWORD}
        register = await _request("POST", service.url + "/auth/register", body=credentials)
        login = await _request("POST", service.url + "/auth/login", body=credentials)
    assert (register[0], login[0]) == (503, 503)


async def test_migrate_command_creates_the_users_table(postgres: TestPostgres) -> None:
    url = postgres.fresh_database("auth_migrate")
    result = await run(sys.executable, "-m", "microapp", "migrate", "auth", "--database-url", url)
    assert result.returncode == 0, result.stderr
    columns = query(
        url,
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'users'"
        " ORDER BY column_name",
    )
    assert [c for (c,) in columns] == [
        "created_at", "email", "id", "password_hash", "role", "updated_at",
    ]  # fmt: skip
