"""auth under hostile input and load: bounded password hashing, no logins without a database
unless asked for, control characters in emails, and key rotation seen by every verifier.

Real `microapp serve auth` processes, a real PostgreSQL and real verifiers; nothing of ours is
mocked.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from microapp.gen.auth.v1.auth_connect import AuthServiceClient
from microapp.gen.auth.v1.auth_pb2 import LoginRequest, RegisterRequest, VerifyRequest
from microapp.gen.greeter.v1.greeter_connect import GreeterServiceClient
from microapp.gen.greeter.v1.greeter_pb2 import GreetRequest
from microapp.platform.authn import InvalidToken, JwksClient
from tests.support.clock import FakeClock
from tests.support.external import ExternalServer
from tests.support.jwt import TestKey
from tests.support.postgres import TestPostgres
from tests.support.services import ServiceProcess

PASSWORD = "correct horse battery"
MIB = 1024 * 1024


def _email() -> str:
    return f"user-{uuid.uuid4().hex[:12]}@example.org"


async def _post(url: str, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
    timeout = aiohttp.ClientTimeout(total=60)  # a hung login fails the test instead of hanging it
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(url, json=body) as resp,
    ):
        return resp.status, await resp.json(content_type=None), dict(resp.headers)


async def _verify(base_url: str, token: str) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(base_url + "/verify", headers={"Authorization": f"Bearer {token}"}) as resp,
    ):
        return resp.status


def _log_records(service: ServiceProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in service.logs().splitlines() if line.startswith("{")]


# --- bounded password hashing ------------------------------------------------------------------


class PeakRss:
    """Samples a process's RSS (children included) in a background thread; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self._stop = threading.Event()
        self.peak = 0
        self.samples = 0

    def _rss(self) -> int:
        family = [self._process, *self._process.children(recursive=True)]
        return sum(p.memory_info().rss for p in family)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self._rss())
                self.samples += 1
            except psutil.NoSuchProcess:
                return
            self._stop.wait(0.005)

    @contextmanager
    def sampling(self) -> Iterator[PeakRss]:
        thread = threading.Thread(target=self._run, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()


async def _auth_with_database(
    postgres: TestPostgres, key: TestKey, name: str, **env: str
) -> ServiceProcess:
    service = ServiceProcess(
        "auth",
        {
            "DATABASE_URL": postgres.fresh_database(name),
            "AUTH_PRIVATE_KEY_FILE": str(key.path),
            **env,
        },
    )
    await service.start()
    await service.wait_for("/healthz", 200)
    return service


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> TestKey:
    return TestKey.new(tmp_path_factory.mktemp("hardening-key") / "auth-key.pem")


@pytest.fixture(scope="module")
async def auth(postgres: TestPostgres, key: TestKey) -> AsyncIterator[ServiceProcess]:
    """auth with its defaults: two hashing slots, a 5 s queue timeout."""
    service = await _auth_with_database(postgres, key, "hardening")
    yield service
    await service.stop()


async def test_forty_concurrent_wrong_password_logins_keep_auth_under_300_mib(
    auth: ServiceProcess,
) -> None:
    email = _email()
    status, _, _ = await _post(auth.url + "/auth/register", {"email": email, "password": PASSWORD})
    assert status == 201
    assert auth.process is not None
    credentials = {"email": email, "password": "wrong password"}

    with PeakRss(auth.process.pid).sampling() as rss:
        answers = await asyncio.gather(
            *(_post(auth.url + "/auth/login", credentials) for _ in range(40))
        )

    statuses = [status for status, _, _ in answers]
    assert set(statuses) <= {401, 503}, statuses
    assert 401 in statuses  # the passwords were really checked
    assert rss.samples > 0
    assert rss.peak < 300 * MIB, f"peak RSS {rss.peak / MIB:.0f} MiB"


@pytest.fixture(scope="module")
async def busy_auth(postgres: TestPostgres, key: TestKey) -> AsyncIterator[ServiceProcess]:
    """One hashing slot and 10 ms of patience: concurrent logins must be refused."""
    service = await _auth_with_database(
        postgres,
        key,
        "hardening_busy",
        AUTH_HASH_CONCURRENCY="1",
        AUTH_HASH_QUEUE_TIMEOUT_S="0.01",
    )
    yield service
    await service.stop()


async def test_logins_beyond_the_hashing_capacity_get_503_json(busy_auth: ServiceProcess) -> None:
    credentials = {"email": _email(), "password": "wrong password"}
    answers = await asyncio.gather(
        *(_post(busy_auth.url + "/auth/login", credentials) for _ in range(20))
    )
    statuses = [status for status, _, _ in answers]
    assert set(statuses) == {401, 503}, statuses
    for status, body, headers in answers:
        if status == 503:
            assert "error" in body
            assert headers["Retry-After"] == "1"


async def test_connect_logins_beyond_the_hashing_capacity_are_unavailable(
    busy_auth: ServiceProcess,
) -> None:
    async def login(client: AuthServiceClient) -> Code:
        try:
            await client.login(LoginRequest(email=_email(), password="wrong password"))
        except ConnectError as exc:
            return exc.code
        return Code.OK

    async with AuthServiceClient(busy_auth.url) as client:
        codes = await asyncio.gather(*(login(client) for _ in range(20)))
    assert set(codes) == {Code.UNAUTHENTICATED, Code.UNAVAILABLE}, codes


async def test_auth_serves_again_once_the_burst_is_over(busy_auth: ServiceProcess) -> None:
    email = _email()
    status, _, _ = await _post(
        busy_auth.url + "/auth/register", {"email": email, "password": PASSWORD}
    )
    assert status == 201
    status, body, _ = await _post(
        busy_auth.url + "/auth/login", {"email": email, "password": PASSWORD}
    )
    assert status == 200 and body["token"]


# --- no database: development mode only when asked for -----------------------------------------


async def test_without_a_database_or_dev_mode_login_is_503(tmp_path: Path) -> None:
    async with ServiceProcess("auth", {"AUTH_DEV_KEY_DIR": str(tmp_path)}) as service:
        credentials = {"email": "anyone@example.org", "password": "anything at all"}
        status, body, _ = await _post(service.url + "/auth/login", credentials)
        async with AuthServiceClient(service.url) as client:
            with pytest.raises(ConnectError) as caught:
                await client.login(LoginRequest(**credentials))
    assert status == 503
    assert "token" not in body and "error" in body
    assert caught.value.code == Code.UNAVAILABLE
    warnings = [r for r in _log_records(service) if "no DATABASE_URL" in r.get("message", "")]
    assert warnings and warnings[0]["level"] == "WARNING"


async def test_with_dev_mode_any_email_logs_in_and_startup_warns(tmp_path: Path) -> None:
    env = {"AUTH_DEV_KEY_DIR": str(tmp_path), "AUTH_DEV_MODE": "1"}
    async with ServiceProcess("auth", env) as service:
        credentials = {"email": "anyone@example.org", "password": "anything at all"}
        status, body, _ = await _post(service.url + "/auth/login", credentials)
        assert status == 200
        assert await _verify(service.url, body["token"]) == 200
    warnings = [r for r in _log_records(service) if "DEVELOPMENT MODE" in r.get("message", "")]
    assert warnings and warnings[0]["level"] == "WARNING"


async def test_dev_mode_beside_a_database_still_checks_passwords(
    postgres: TestPostgres, key: TestKey
) -> None:
    service = await _auth_with_database(postgres, key, "hardening_dev", AUTH_DEV_MODE="1")
    try:
        credentials = {"email": "anyone@example.org", "password": "anything at all"}
        status, _, _ = await _post(service.url + "/auth/login", credentials)
    finally:
        await service.stop()
    assert status == 401


# --- control characters in emails ----------------------------------------------------------------

CONTROL_EMAILS = {
    "NUL inside": "ada\x00@example.org",
    "NUL at the end": "ada@example.org\x00",
    "newline at the end": "ada@example.org\n",
    "tab in front": "\tada@example.org",
    "escape": "ada\x1b[2J@example.org",
    "DEL": "ada\x7f@example.org",
    "C1 next line": "ada\x85@example.org",
}


@pytest.mark.parametrize("case", list(CONTROL_EMAILS))
@pytest.mark.parametrize("path", ["/auth/login", "/auth/register"])
async def test_an_email_with_control_characters_is_400(
    auth: ServiceProcess, path: str, case: str
) -> None:
    body = {"email": CONTROL_EMAILS[case], "password": PASSWORD}
    status, answer, _ = await _post(auth.url + path, body)
    assert status == 400
    assert "error" in answer


@pytest.mark.parametrize("case", list(CONTROL_EMAILS))
async def test_connect_refuses_an_email_with_control_characters_as_invalid_argument(
    auth: ServiceProcess, case: str
) -> None:
    email = CONTROL_EMAILS[case]
    async with AuthServiceClient(auth.url) as client:
        with pytest.raises(ConnectError) as login:
            await client.login(LoginRequest(email=email, password=PASSWORD))
        with pytest.raises(ConnectError) as register:
            await client.register(RegisterRequest(email=email, password=PASSWORD))
    assert (login.value.code, register.value.code) == (Code.INVALID_ARGUMENT,) * 2


async def test_an_email_with_a_nul_is_refused_before_the_database(auth: ServiceProcess) -> None:
    # Reaching PostgreSQL, NUL would be its own error text in a 500 / `unknown`.
    status, answer, _ = await _post(
        auth.url + "/auth/login", {"email": "ada\x00@example.org", "password": PASSWORD}
    )
    assert status == 400
    assert "email" in answer["error"] and "0x00" not in answer["error"]
    email = _email()
    status, _, _ = await _post(auth.url + "/auth/register", {"email": email, "password": PASSWORD})
    assert status == 201  # and the service goes on serving


# --- key rotation ------------------------------------------------------------------------------


@dataclass
class Rotation:
    old: TestKey
    new: TestKey
    old_public: Path
    directory: Path


def _write_public(key: TestKey, path: Path) -> Path:
    path.write_bytes(key.public_pem)
    return path


@pytest.fixture(scope="module")
def rotation(tmp_path_factory: pytest.TempPathFactory) -> Rotation:
    directory = tmp_path_factory.mktemp("rotation")
    old = TestKey.new(directory / "old.pem")
    return Rotation(
        old=old,
        new=TestKey.new(directory / "new.pem"),
        old_public=_write_public(old, directory / "old.pub.pem"),
        directory=directory,
    )


def _rotated_env(rotation: Rotation) -> dict[str, str]:
    return {
        "AUTH_PRIVATE_KEY_FILE": str(rotation.new.path),
        "AUTH_PREVIOUS_PUBLIC_KEY_FILES": str(rotation.old_public),
    }


@dataclass
class RotatedStack:
    auth: ServiceProcess
    greeter: ServiceProcess


@pytest.fixture(scope="module")
async def rotated(rotation: Rotation, external: ExternalServer) -> AsyncIterator[RotatedStack]:
    """auth after a rotation, and a greeter requiring tokens checked against auth's JWKS."""
    caller_env = {"CALLER_ALLOW_PRIVATE_NETWORKS": "1"}  # the external target is on loopback
    async with (
        ServiceProcess("auth", _rotated_env(rotation)) as auth,
        ServiceProcess("caller", caller_env) as caller,
    ):
        greeter_env = {
            "AUTH_REQUIRED": "1",
            "AUTH_JWKS_URL": auth.url + "/.well-known/jwks.json",
            "CALLER_BASE_URL": caller.url,
            "EXTERNAL_API_URL": external.url(size=7),
        }
        async with ServiceProcess("greeter", greeter_env) as greeter:
            yield RotatedStack(auth, greeter)


async def _greet(greeter: ServiceProcess, token: str) -> str:
    async with GreeterServiceClient(greeter.url) as client:
        response = await client.greet(
            GreetRequest(name="Ada"), headers={"Authorization": f"Bearer {token}"}
        )
    return response.message


async def test_the_jwks_publishes_the_new_key_and_the_previous_one(
    rotated: RotatedStack, rotation: Rotation
) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(rotated.auth.url + "/.well-known/jwks.json") as resp,
    ):
        jwks = await resp.json()
    assert [entry["kid"] for entry in jwks["keys"]] == [rotation.new.kid, rotation.old.kid]
    assert all("d" not in entry for entry in jwks["keys"])


async def test_a_token_signed_by_the_previous_key_verifies_at_auth(
    rotated: RotatedStack, rotation: Rotation
) -> None:
    token = rotation.old.sign(sub="signed-before-rotation")
    assert await _verify(rotated.auth.url, token) == 200
    async with AuthServiceClient(rotated.auth.url) as client:
        verified = await client.verify(VerifyRequest(token=token))
    assert verified.user_id == "signed-before-rotation"


@pytest.mark.parametrize("which", ["old", "new"])
async def test_tokens_of_both_keys_are_served_by_a_service_requiring_tokens(
    rotated: RotatedStack, rotation: Rotation, which: str
) -> None:
    key = rotation.old if which == "old" else rotation.new
    assert await _greet(rotated.greeter, key.sign()) == "Hello Ada from greeter-service!"


async def test_a_token_signed_by_an_unknown_key_is_refused_everywhere(
    rotated: RotatedStack, rotation: Rotation
) -> None:
    stranger = TestKey.new(rotation.directory / "stranger.pem").sign()
    assert await _verify(rotated.auth.url, stranger) == 401
    async with AuthServiceClient(rotated.auth.url) as client:
        with pytest.raises(ConnectError) as at_auth:
            await client.verify(VerifyRequest(token=stranger))
    with pytest.raises(ConnectError) as at_greeter:
        await _greet(rotated.greeter, stranger)
    assert (at_auth.value.code, at_greeter.value.code) == (Code.UNAUTHENTICATED,) * 2


async def test_a_previous_private_key_file_works_like_its_public_key(rotation: Rotation) -> None:
    env = {**_rotated_env(rotation), "AUTH_PREVIOUS_PUBLIC_KEY_FILES": str(rotation.old.path)}
    async with ServiceProcess("auth", env) as auth:
        assert await _verify(auth.url, rotation.old.sign()) == 200


async def test_an_unreadable_previous_key_file_stops_auth_with_a_clear_message(
    rotation: Rotation,
) -> None:
    missing = rotation.directory / "missing.pub.pem"
    env = {**_rotated_env(rotation), "AUTH_PREVIOUS_PUBLIC_KEY_FILES": str(missing)}
    service = ServiceProcess("auth", env)
    with pytest.raises(RuntimeError, match="exited early"):
        await service.start()
    assert service.process is not None
    assert await service.process.wait() == 2
    assert "AUTH_PREVIOUS_PUBLIC_KEY_FILES" in service.logs()


# --- verifiers: TTL and unknown-kid refresh, against a real auth being rotated -----------------


def _with_kid(token: str, kid: str) -> str:
    """`token` with another kid in its header, as an attacker would send it."""
    _, payload, signature = token.split(".")
    header = {"alg": "RS256", "typ": "JWT", "kid": kid}
    encoded = base64.urlsafe_b64encode(json.dumps(header).encode()).rstrip(b"=").decode()
    return f"{encoded}.{payload}.{signature}"


async def _restart(auth: ServiceProcess, env: dict[str, str]) -> ServiceProcess:
    """Stop `auth` and start it again with `env` on the same port, as a rotation would."""
    await auth.stop()
    restarted = ServiceProcess("auth", env)
    restarted.port, restarted.url = auth.port, auth.url
    await restarted.start()
    return restarted


@dataclass
class Verifier:
    client: JwksClient
    clock: FakeClock
    auth: ServiceProcess


@pytest.fixture
async def verifier(rotation: Rotation) -> AsyncIterator[Verifier]:
    """A JWKS client with the default limits and an injected clock, and auth before rotation."""
    auth = ServiceProcess("auth", {"AUTH_PRIVATE_KEY_FILE": str(rotation.old.path)})
    await auth.start()
    clock = FakeClock()
    client = JwksClient(auth.url + "/.well-known/jwks.json", ttl_s=300, clock=clock)
    state = Verifier(client, clock, auth)
    try:
        async with client:
            yield state
    finally:
        await state.auth.stop()


async def test_a_verifier_holding_the_old_keys_accepts_the_new_kid_without_waiting_the_ttl(
    verifier: Verifier, rotation: Rotation
) -> None:
    await verifier.client.verify(rotation.old.sign())
    assert verifier.client.fetches == 1

    verifier.auth = await _restart(verifier.auth, _rotated_env(rotation))
    verifier.clock.now += 6  # past the unknown-kid throttle, far from the 300 s TTL
    principal = await verifier.client.verify(rotation.new.sign(sub="after-rotation"))
    assert principal.user_id == "after-rotation"
    assert verifier.client.fetches == 2
    # The previous key is still published, so the old token keeps verifying.
    await verifier.client.verify(rotation.old.sign())
    assert verifier.client.fetches == 2


async def test_a_verifier_fetches_again_after_the_ttl_and_not_before(
    verifier: Verifier, rotation: Rotation
) -> None:
    token = rotation.old.sign()
    await verifier.client.verify(token)
    verifier.clock.now += 299
    await verifier.client.verify(token)
    assert verifier.client.fetches == 1
    verifier.clock.now += 2
    await verifier.client.verify(token)
    assert verifier.client.fetches == 2


async def test_a_key_auth_stopped_publishing_stops_verifying_after_the_ttl(
    verifier: Verifier, rotation: Rotation
) -> None:
    token = rotation.old.sign()
    await verifier.client.verify(token)
    # Rotated without keeping the old key: its tokens must stop verifying, at the latest
    # once the TTL has passed.
    env = {"AUTH_PRIVATE_KEY_FILE": str(rotation.new.path)}
    verifier.auth = await _restart(verifier.auth, env)
    verifier.clock.now += 301
    with pytest.raises(InvalidToken):
        await verifier.client.verify(token)
    assert verifier.client.fetches == 2


async def test_a_flood_of_unknown_kids_fetches_at_most_once_per_interval(
    verifier: Verifier, rotation: Rotation
) -> None:
    token = rotation.old.sign()
    await verifier.client.verify(token)
    for i in range(100):
        verifier.clock.now += 0.01
        with pytest.raises(InvalidToken):
            await verifier.client.verify(_with_kid(token, f"made-up-{i}"))
    assert verifier.client.fetches == 1  # one second of garbage is within the 5 s throttle
    verifier.clock.now += 5
    with pytest.raises(InvalidToken):
        await verifier.client.verify(_with_kid(token, "made-up-later"))
    assert verifier.client.fetches == 2


async def test_a_bad_jwks_ttl_stops_a_service_requiring_tokens_with_a_clear_message() -> None:
    env = {
        "AUTH_REQUIRED": "1",
        "AUTH_JWKS_URL": "http://127.0.0.1:1/.well-known/jwks.json",
        "AUTH_JWKS_TTL_S": "soon",
    }
    service = ServiceProcess("greeter", env)
    with pytest.raises(RuntimeError, match="exited early"):
        await service.start()
    assert service.process is not None
    assert await service.process.wait() == 2
    assert "AUTH_JWKS_TTL_S" in service.logs()
