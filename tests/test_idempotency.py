"""Idempotency-Key: real service processes, real PostgreSQL, real downstream targets.

Each repeat is checked where its side effects would land: greetings rows and hits on the
external target (greeter), executions and invocations rows (gateway → custom-lang), users
rows (auth). The stores' own rules (capacity, expiry, lease) are pinned on an injected clock.
"""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from playwright.async_api import Request, async_playwright, expect

from microapp.gen.auth.v1.auth_connect import AuthServiceClient
from microapp.gen.auth.v1.auth_pb2 import RegisterRequest
from microapp.gen.gateway.v1.gateway_connect import GatewayServiceClient
from microapp.gen.gateway.v1.gateway_pb2 import InvokeCustomRequest
from microapp.gen.greeter.v1.greeter_pb2 import GreetRequest, GreetResponse
from microapp.platform.idempotency import (
    ErrorOutcome,
    HttpOutcome,
    IdempotencySettings,
    InvalidKey,
    MemoryIdempotencyStore,
    MessageOutcome,
    canonical_message,
    fingerprint,
    outcome_from_json,
    outcome_to_json,
    parse_key,
)
from tests.support.browser import (
    CHROMIUM_ARGS,
    ServiceGroup,
    require_chromium,
    service_on_port,
)
from tests.support.clock import FakeClock
from tests.support.external import ExternalServer
from tests.support.polling import eventually
from tests.support.ports import free_port
from tests.support.postgres import TestPostgres, query
from tests.support.services import ServiceProcess

GREET = "/greeter.v1.GreeterService/Greet"
INVOKE = "/gateway.v1.GatewayService/InvokeCustom"
REGISTER = "/auth.v1.AuthService/Register"
PASSWORD = "correct horse battery"
CONNECT_JSON = {"Content-Type": "application/json", "Connect-Protocol-Version": "1"}


def new_key() -> str:
    return str(uuid.uuid4())


def count(url: str, table: str, where: str = "true", params: tuple[Any, ...] = ()) -> int:
    return int(query(url, f"SELECT count(*) FROM {table} WHERE {where}", params)[0][0])


@dataclass
class Answer:
    status: int
    body: bytes
    replayed: bool

    def json(self) -> Any:
        return json.loads(self.body)


async def post(url: str, body: object, key: str | None, **headers: str) -> Answer:
    """One JSON POST (Connect JSON or REST) with an optional Idempotency-Key."""
    sent = {**CONNECT_JSON, **headers}
    if key is not None:
        sent["Idempotency-Key"] = key
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=json.dumps(body), headers=sent) as resp,
    ):
        replayed = resp.headers.get("Idempotent-Replayed") == "true"
        return Answer(resp.status, await resp.read(), replayed)


async def grpc_greet(port: int, name: str, key: str) -> tuple[GreetResponse, bool]:
    """Greet over gRPC (grpcio, HTTP/2), the key sent as metadata; and whether it replayed."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        greet = channel.unary_unary(
            GREET,
            request_serializer=GreetRequest.SerializeToString,
            response_deserializer=GreetResponse.FromString,
        )
        call = greet(GreetRequest(name=name), metadata=(("idempotency-key", key),), timeout=10)
        response = await call
        metadata = await call.initial_metadata()
    return response, dict(metadata).get("idempotent-replayed") == "true"


# --- the rules, without servers ----------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ([""], "must not be empty"),
        (["k" * 256], "at most 255"),
        (["a\tb"], "printable ASCII"),
        (["a\x7fb"], "printable ASCII"),
        (["caf\u00e9"], "printable ASCII"),
        (["a", "b"], "sent once"),
    ],
)
def test_unusable_keys_are_refused_with_the_reason(values: list[str], problem: str) -> None:
    with pytest.raises(InvalidKey, match=problem):
        parse_key(values)


def test_usable_keys_are_one_to_255_printable_characters() -> None:
    assert parse_key([]) is None
    assert parse_key(["k"]) == "k"
    assert parse_key(["~" * 255]) == "~" * 255
    assert parse_key(["order 42: retry"]) == "order 42: retry"


def test_the_fingerprint_leaves_out_unfingerprinted_fields_only() -> None:
    one = RegisterRequest(email="a@example.org", password="first password")
    two = RegisterRequest(email="a@example.org", password="other password")
    three = RegisterRequest(email="b@example.org", password="first password")

    def of(message: RegisterRequest) -> bytes:
        return fingerprint(REGISTER, canonical_message(message, ("password",)))

    assert of(one) == of(two)
    assert of(one) != of(three)
    assert fingerprint(REGISTER, canonical_message(one)) != fingerprint(
        REGISTER, canonical_message(two)
    )
    assert one.password == "first password"  # the request itself is left as it came


@pytest.mark.parametrize(
    "outcome",
    [
        MessageOutcome("greeter.v1.GreetResponse", b"\x0a\x02hi\x00\xff"),
        ErrorOutcome(Code.NOT_FOUND, "no such name"),
        HttpOutcome(201, "application/json", b'{"id": "x"}'),
    ],
)
def test_outcomes_survive_their_stored_form(outcome: Any) -> None:
    stored = json.loads(json.dumps(outcome_to_json(outcome)))
    assert outcome_from_json(stored) == outcome


async def test_memory_store_evicts_the_least_recently_used_key_past_its_capacity() -> None:
    store = MemoryIdempotencyStore(IdempotencySettings(memory_keys=3))
    done = MessageOutcome("t", b"")
    for key in ("a", "b", "c"):
        claim = await store.claim("p", key, b"f")
        await store.finish("p", key, claim.owner, done)  # type: ignore[union-attr]
    await store.claim("p", "a", b"f")  # a is used again: b is now the oldest
    await store.claim("p", "d", b"f")
    assert len(store) == 3
    assert type(await store.claim("p", "b", b"f")).__name__ == "Claimed"  # evicted: runs again
    for key in ("a", "d"):
        assert type(await store.claim("p", key, b"f")).__name__ == "Existing"


async def test_memory_store_runs_an_expired_key_again_and_prunes_it() -> None:
    clock = FakeClock()
    store = MemoryIdempotencyStore(IdempotencySettings(ttl_s=60), clock=clock)
    claim = await store.claim("p", "k", b"f")
    await store.finish("p", "k", claim.owner, ErrorOutcome(Code.NOT_FOUND, "x"))  # type: ignore[union-attr]
    clock.now += 59
    assert type(await store.claim("p", "k", b"f")).__name__ == "Existing"
    assert await store.prune() == 0
    clock.now += 1
    assert await store.prune() == 1
    assert type(await store.claim("p", "k", b"other")).__name__ == "Claimed"


async def test_memory_store_takes_over_a_claim_abandoned_past_its_lease() -> None:
    clock = FakeClock()
    store = MemoryIdempotencyStore(IdempotencySettings(lease_s=30), clock=clock)
    first = await store.claim("p", "k", b"f")
    clock.now += 29
    assert type(await store.claim("p", "k", b"f")).__name__ == "Existing"
    clock.now += 1
    assert type(await store.claim("p", "k", b"different")).__name__ == "Existing"
    second = await store.claim("p", "k", b"f")
    assert type(second).__name__ == "Claimed"
    # The abandoned call can no longer store an outcome over the new claim.
    await store.finish("p", "k", first.owner, ErrorOutcome(Code.INTERNAL, "late"))  # type: ignore[union-attr]
    found = await store.claim("p", "k", b"f")
    assert type(found).__name__ == "Existing" and found.outcome is None  # type: ignore[union-attr]


# --- the services ------------------------------------------------------------------------


@dataclass
class Greeter:
    service: ServiceProcess
    database: str
    external: ExternalServer

    def greetings(self, name: str) -> int:
        return count(self.database, "greetings", "name = %s", (name,))


@pytest.fixture(scope="module")
async def target() -> AsyncIterator[ExternalServer]:
    """The greeter's outside world, counting every call that reaches it."""
    server = ExternalServer()
    await server.start()
    yield server
    await server.close()


@pytest.fixture(scope="module")
async def caller() -> AsyncIterator[ServiceProcess]:
    async with ServiceProcess("caller") as service:
        yield service


def greeter_env(database: str, caller: ServiceProcess, external_url: str) -> dict[str, str]:
    return {
        "DATABASE_URL": database,
        "CALLER_BASE_URL": caller.url,
        "EXTERNAL_API_URL": external_url,
        "IDEMPOTENCY_PRUNE_INTERVAL_S": "1",
    }


@pytest.fixture(scope="module")
async def greeter(
    postgres: TestPostgres, caller: ServiceProcess, target: ExternalServer
) -> AsyncIterator[Greeter]:
    database = postgres.fresh_database("idem_greeter")
    env = greeter_env(database, caller, target.url())
    async with ServiceProcess("greeter", env) as service:
        await service.wait_for("/healthz", 200)
        yield Greeter(service, database, target)


@dataclass
class Gateway:
    service: ServiceProcess
    database: str | None
    lang_database: str

    def executions(self, name: str) -> int:
        return count(self.lang_database, "executions", "name = %s", (name,))

    def invocations(self, name: str) -> int:
        assert self.database is not None
        return count(self.database, "invocations", "name = %s", (name,))

    async def invoke(self, name: str, key: str) -> str:
        async with GatewayServiceClient(self.service.url) as client:
            response = await client.invoke_custom(
                InvokeCustomRequest(name=name), headers={"Idempotency-Key": key}
            )
        return response.message

    async def invoke_error(self, name: str, key: str) -> ConnectError:
        with pytest.raises(ConnectError) as caught:
            await self.invoke(name, key)
        return caught.value


@pytest.fixture(scope="module")
async def lang(postgres: TestPostgres) -> AsyncIterator[tuple[ServiceProcess, str]]:
    database = postgres.fresh_database("idem_lang")
    async with ServiceProcess("custom-lang", {"DATABASE_URL": database}) as service:
        await service.wait_for("/healthz", 200)
        yield service, database


def gateway_env(lang: ServiceProcess, database: str | None) -> dict[str, str]:
    env = {"CUSTOM_LANG_BASE_URL": lang.url, "GATEWAY_BREAKER_FAILURES": "1000000"}
    if database is not None:
        env["DATABASE_URL"] = database
    return env


@pytest.fixture(scope="module")
async def gateway(
    postgres: TestPostgres, lang: tuple[ServiceProcess, str]
) -> AsyncIterator[Gateway]:
    database = postgres.fresh_database("idem_gateway")
    async with ServiceProcess("gateway", gateway_env(lang[0], database)) as service:
        await service.wait_for("/healthz", 200)
        yield Gateway(service, database, lang[1])


@dataclass
class Auth:
    service: ServiceProcess
    database: str

    def users(self, email: str) -> int:
        return count(self.database, "users", "email = %s", (email,))

    async def register(self, email: str, key: str) -> ConnectError | str:
        try:
            async with AuthServiceClient(self.service.url) as client:
                response = await client.register(
                    RegisterRequest(email=email, password=PASSWORD),
                    headers={"Idempotency-Key": key},
                )
        except ConnectError as exc:
            return exc
        return response.id


@pytest.fixture(scope="module")
async def auth(
    postgres: TestPostgres, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Auth]:
    database = postgres.fresh_database("idem_auth")
    env = {"DATABASE_URL": database, "AUTH_DEV_KEY_DIR": str(tmp_path_factory.mktemp("keys"))}
    async with ServiceProcess("auth", env) as service:
        await service.wait_for("/healthz", 200)
        yield Auth(service, database)


# --- a repeat replays --------------------------------------------------------------------


async def test_a_repeated_greet_replays_the_same_bytes_without_a_row_or_a_call(
    greeter: Greeter,
) -> None:
    key, hits = new_key(), greeter.external.requests
    first = await post(greeter.service.url + GREET, {"name": "Ada"}, key)
    second = await post(greeter.service.url + GREET, {"name": "Ada"}, key)
    assert first.status == second.status == 200
    assert first.json()["message"] == "Hello Ada from greeter-service!"
    assert second.body == first.body
    assert (first.replayed, second.replayed) == (False, True)
    assert greeter.greetings("Ada") == 1
    assert greeter.external.requests == hits + 1


async def test_a_repeated_v2_greet_replays_too(greeter: Greeter) -> None:
    key, hits = new_key(), greeter.external.requests
    url = greeter.service.url + "/greeter.v2.GreeterService/Greet"
    first = await post(url, {"name": "Marie", "locale": "fr"}, key)
    second = await post(url, {"name": "Marie", "locale": "fr"}, key)
    assert first.status == 200 and second.body == first.body and second.replayed
    assert greeter.greetings("Marie") == 1
    assert greeter.external.requests == hits + 1
    # A key is scoped to its procedure: the same key on v1 is a call of its own.
    v1 = await post(greeter.service.url + GREET, {"name": "Marie"}, key)
    assert v1.status == 200 and not v1.replayed


async def test_without_a_key_every_greet_runs(greeter: Greeter) -> None:
    for _ in range(2):
        assert (await post(greeter.service.url + GREET, {"name": "Keyless"}, None)).status == 200
    assert greeter.greetings("Keyless") == 2


async def test_a_repeat_over_grpc_replays_a_call_first_made_over_connect(greeter: Greeter) -> None:
    key, hits = new_key(), greeter.external.requests
    first, first_replayed = await grpc_greet(greeter.service.port, "Grace", key)
    second, second_replayed = await grpc_greet(greeter.service.port, "Grace", key)
    assert second == first and (first_replayed, second_replayed) == (False, True)
    # The fingerprint is of the request message, whatever protocol carried it.
    over_connect = await post(greeter.service.url + GREET, {"name": "Grace"}, key)
    assert over_connect.replayed
    assert over_connect.json()["message"] == first.message
    assert greeter.greetings("Grace") == 1
    assert greeter.external.requests == hits + 1


async def test_a_repeated_invoke_calls_custom_lang_once(gateway: Gateway) -> None:
    key = new_key()
    answers = [await gateway.invoke("Linus", key) for _ in range(3)]
    assert answers == ["Hello Linus from custom-lang-service!"] * 3
    assert gateway.executions("Linus") == 1
    assert gateway.invocations("Linus") == 1


async def test_an_error_outcome_replays_too(gateway: Gateway) -> None:
    key = new_key()
    first = await gateway.invoke_error("notfound", key)
    second = await gateway.invoke_error("notfound", key)
    assert first.code == second.code == Code.NOT_FOUND
    assert second.message == first.message
    assert gateway.executions("notfound") == 1
    assert gateway.invocations("notfound") == 1


async def test_a_transient_error_leaves_the_key_free_for_the_retry(gateway: Gateway) -> None:
    # custom-lang answers 503 for "unavailable": the retry the key protects must run.
    key = new_key()
    for _ in range(2):
        assert (await gateway.invoke_error("unavailable", key)).code == Code.UNAVAILABLE
    # Each call tries twice (the gateway's own budgeted retry of a 503).
    assert gateway.executions("unavailable") == 4
    rows = query(
        gateway.database or "", "SELECT count(*) FROM idempotency_keys WHERE key = %s", (key,)
    )
    assert rows == [(0,)]


async def test_a_repeated_rest_register_replays_201_without_a_second_user(auth: Auth) -> None:
    email, key = f"rest-{new_key()}@example.org", new_key()
    body = {"email": email, "password": PASSWORD}
    first = await post(auth.service.url + "/auth/register", body, key)
    second = await post(auth.service.url + "/auth/register", body, key)
    assert (first.status, second.status) == (201, 201)
    assert second.body == first.body and second.replayed
    assert first.json()["email"] == email
    assert auth.users(email) == 1


async def test_a_repeated_connect_register_replays_the_same_user(auth: Auth) -> None:
    email, key = f"connect-{new_key()}@example.org", new_key()
    first = await auth.register(email, key)
    second = await auth.register(email, key)
    assert isinstance(first, str) and second == first
    assert auth.users(email) == 1


async def test_an_existing_email_replays_already_exists(auth: Auth) -> None:
    email, key = f"taken-{new_key()}@example.org", new_key()
    assert isinstance(await auth.register(email, new_key()), str)
    first = await auth.register(email, key)
    assert isinstance(first, ConnectError) and first.code == Code.ALREADY_EXISTS
    # Were the repeat run, it would now create the user: it replays the stored refusal.
    query(auth.database, "DELETE FROM users WHERE email = %s", (email,))
    second = await auth.register(email, key)
    assert isinstance(second, ConnectError) and second.code == Code.ALREADY_EXISTS
    assert second.message == first.message
    assert auth.users(email) == 0


# --- a key is one request ----------------------------------------------------------------


async def test_the_same_key_with_a_different_request_is_failed_precondition(
    greeter: Greeter,
) -> None:
    key = new_key()
    assert (await post(greeter.service.url + GREET, {"name": "Alan"}, key)).status == 200
    refused = await post(greeter.service.url + GREET, {"name": "Alonzo"}, key)
    assert refused.status == 400
    assert refused.json()["code"] == "failed_precondition"
    assert "different request" in refused.json()["message"]
    assert greeter.greetings("Alonzo") == 0


async def test_the_same_key_with_a_different_rest_body_is_422(auth: Auth) -> None:
    key = new_key()
    url = auth.service.url + "/auth/register"
    first = await post(url, {"email": f"a-{key}@example.org", "password": PASSWORD}, key)
    assert first.status == 201
    refused = await post(url, {"email": f"b-{key}@example.org", "password": PASSWORD}, key)
    assert refused.status == 422
    assert "different request" in refused.json()["error"]
    assert auth.users(f"b-{key}@example.org") == 0


# --- concurrency, expiry, restarts, crashes ----------------------------------------------


async def test_twenty_concurrent_duplicates_run_once(gateway: Gateway) -> None:
    key = new_key()
    url = gateway.service.url + INVOKE
    answers = await asyncio.gather(*(post(url, {"name": "Herd"}, key) for _ in range(20)))
    assert {a.status for a in answers} == {200}
    assert len({a.body for a in answers}) == 1
    assert sum(a.replayed for a in answers) == 19
    assert gateway.executions("Herd") == 1
    assert gateway.invocations("Herd") == 1


async def test_keys_are_kept_24_hours_and_an_expired_key_runs_again(greeter: Greeter) -> None:
    key = new_key()
    url = greeter.service.url + GREET
    first = await post(url, {"name": "Expiring"}, key)
    rows = query(
        greeter.database,
        "SELECT status, expires_at - created_at FROM idempotency_keys WHERE key = %s",
        (key,),
    )
    assert [(status, lifetime.total_seconds()) for status, lifetime in rows] == [
        ("done", 24 * 3600.0)
    ]
    # Time passes for the key, as the database sees it.
    query(
        greeter.database,
        "UPDATE idempotency_keys SET expires_at = now() - interval '1 second' WHERE key = %s",
        (key,),
    )
    again = await post(url, {"name": "Expiring"}, key)
    assert again.status == 200 and not again.replayed
    assert again.json()["message"] == first.json()["message"]
    assert greeter.greetings("Expiring") == 2


async def test_expired_keys_are_pruned(greeter: Greeter) -> None:
    # This greeter prunes every second (IDEMPOTENCY_PRUNE_INTERVAL_S=1).
    key = new_key()
    await post(greeter.service.url + GREET, {"name": "Pruned"}, key)
    query(
        greeter.database,
        "UPDATE idempotency_keys SET expires_at = now() - interval '1 second' WHERE key = %s",
        (key,),
    )

    def gone() -> bool:
        return count(greeter.database, "idempotency_keys", "key = %s", (key,)) == 0

    await eventually(gone)


async def test_a_restarted_gateway_still_replays(
    postgres: TestPostgres, lang: tuple[ServiceProcess, str]
) -> None:
    database = postgres.fresh_database("idem_restart")
    gateway = Gateway(ServiceProcess("gateway", gateway_env(lang[0], database)), database, lang[1])
    key = new_key()
    async with gateway.service:
        await gateway.service.wait_for("/healthz", 200)
        first = await gateway.invoke("Restart", key)
    gateway.service = ServiceProcess("gateway", gateway_env(lang[0], database))
    async with gateway.service:
        await gateway.service.wait_for("/healthz", 200)
        assert await gateway.invoke("Restart", key) == first
    assert gateway.executions("Restart") == 1
    assert gateway.invocations("Restart") == 1


async def test_a_claim_left_by_a_killed_process_is_taken_over_after_its_lease(
    postgres: TestPostgres, caller: ServiceProcess, target: ExternalServer
) -> None:
    database = postgres.fresh_database("idem_lease")
    key = new_key()
    # The first greeter is stuck on a slow target when it is killed, mid-call.
    slow = ServiceProcess(
        "greeter",
        {**greeter_env(database, caller, target.url(delay=30)), "IDEMPOTENCY_LEASE_S": "1"},
    )
    await slow.start()
    await slow.wait_for("/healthz", 200)
    stuck = asyncio.create_task(post(slow.url + GREET, {"name": "Orphan"}, key))
    try:

        def claimed() -> bool:
            return count(database, "idempotency_keys", "key = %s", (key,)) == 1

        await eventually(claimed)
        await slow.stop(signal.SIGKILL)
    finally:
        stuck.cancel()
        await asyncio.gather(stuck, return_exceptions=True)
    env = {**greeter_env(database, caller, target.url()), "IDEMPOTENCY_LEASE_S": "1"}
    async with ServiceProcess("greeter", env) as fresh:
        await fresh.wait_for("/healthz", 200)
        answer = await post(fresh.url + GREET, {"name": "Orphan"}, key)
    assert answer.status == 200 and not answer.replayed
    assert count(database, "greetings", "name = %s", ("Orphan",)) == 1
    assert query(database, "SELECT status FROM idempotency_keys WHERE key = %s", (key,)) == [
        ("done",)
    ]


async def test_without_a_database_the_memory_store_replays(
    lang: tuple[ServiceProcess, str],
) -> None:
    gateway = Gateway(ServiceProcess("gateway", gateway_env(lang[0], None)), None, lang[1])
    key = new_key()
    async with gateway.service:
        answers = [await gateway.invoke("Memory", key) for _ in range(2)]
        other = await gateway.invoke_error("notfound", key)
    assert answers == ["Hello Memory from custom-lang-service!"] * 2
    assert other.code == Code.FAILED_PRECONDITION
    assert gateway.executions("Memory") == 1


async def test_a_key_is_unavailable_while_the_database_is_down(
    lang: tuple[ServiceProcess, str],
) -> None:
    # Nothing listens on this port: the database is configured but never comes up.
    down = f"postgresql://microapp@127.0.0.1:{free_port()}/gateway_db"
    gateway = Gateway(ServiceProcess("gateway", gateway_env(lang[0], down)), down, lang[1])
    async with gateway.service:
        refused = await gateway.invoke_error("Outage", new_key())
        # Without a key the call runs as it always did.
        async with GatewayServiceClient(gateway.service.url) as client:
            served = await client.invoke_custom(InvokeCustomRequest(name="Outage"))
    assert refused.code == Code.UNAVAILABLE
    assert "Idempotency-Key" in refused.message
    assert served.message == "Hello Outage from custom-lang-service!"
    assert gateway.executions("Outage") == 1


async def test_a_browser_may_send_the_key_across_origins(
    lang: tuple[ServiceProcess, str],
) -> None:
    origin = "http://console.example"
    env = {**gateway_env(lang[0], None), "CORS_ALLOWED_ORIGINS": origin}
    preflight = {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,connect-protocol-version,idempotency-key",
    }
    async with (
        ServiceProcess("gateway", env) as service,
        aiohttp.ClientSession() as session,
        session.options(service.url + INVOKE, headers=preflight) as resp,
    ):
        assert resp.status == 200
        allowed = resp.headers["Access-Control-Allow-Headers"].lower()
    assert "idempotency-key" in allowed


async def test_the_console_sends_a_fresh_key_with_each_click(
    postgres: TestPostgres, lang: tuple[ServiceProcess, str]
) -> None:
    executable = require_chromium()
    web_port = free_port()
    database = postgres.fresh_database("idem_console")
    env = {**gateway_env(lang[0], database), "CORS_ALLOWED_ORIGINS": f"http://127.0.0.1:{web_port}"}
    gateway = Gateway(ServiceProcess("gateway", env), database, lang[1])
    web = service_on_port("web", web_port, {"WEB_GATEWAY_BASE_URL": gateway.service.url})
    async with ServiceGroup([gateway.service, web]), async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        page = await chromium.new_page()
        sent: list[str] = []

        def record_key(request: Request) -> None:
            key = request.headers.get("idempotency-key")
            if INVOKE in request.url and key is not None:
                sent.append(key)

        page.on("request", record_key)
        await page.goto(web.url + "/")
        await expect(page.locator("body")).to_have_attribute("data-ready", "true")
        await page.fill("#gateway-name", "Clicked")
        # Two clicks on the same name: two calls, each with a key of its own.
        await page.click("#gateway-submit")
        await eventually(lambda: gateway.invocations("Clicked") == 1)
        await expect(page.locator("#gateway-submit")).to_be_enabled()
        await page.click("#gateway-submit")
        await eventually(lambda: gateway.invocations("Clicked") == 2)
        await chromium.close()
    keys = [row[0] for row in query(database, "SELECT key FROM idempotency_keys")]
    assert len(keys) == 2 and len(set(keys)) == 2
    assert sorted(sent) == sorted(keys)
    assert gateway.invocations("Clicked") == 2


# --- unusable keys -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [b"", b"k" * 256, b"tab\there", b"caf\xc3\xa9"],
    ids=["empty", "256-characters", "control-character", "non-ascii"],
)
async def test_an_unusable_key_is_invalid_argument_and_runs_nothing(
    greeter: Greeter, auth: Auth, key: bytes
) -> None:
    name = f"Bad key {key[:8]!r}"
    greet = await raw_post(greeter.service.url + GREET, {"name": name}, key)
    assert greet.status == 400
    assert greet.json()["code"] == "invalid_argument"
    assert "Idempotency-Key" in greet.json()["message"]
    assert greeter.greetings(name) == 0
    email = f"badkey-{new_key()}@example.org"
    body = {"email": email, "password": PASSWORD}
    register = await raw_post(auth.service.url + "/auth/register", body, key)
    assert register.status == 400
    assert "Idempotency-Key" in register.json()["error"]
    assert auth.users(email) == 0


async def raw_post(url: str, body: object, key: bytes) -> Answer:
    """A POST whose Idempotency-Key bytes go out exactly as given (HTTP/1.1, raw socket)."""
    host, port = url.split("//")[1].split("/")[0].split(":")
    path = "/" + url.split("//")[1].split("/", 1)[1]
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Connect-Protocol-Version: 1\r\nContent-Length: {len(data)}\r\nConnection: close\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head + b"Idempotency-Key: " + key + b"\r\n\r\n" + data)
        await writer.drain()
        response = await reader.read()
    finally:
        writer.close()
    header_block, _, payload = response.partition(b"\r\n\r\n")
    status = int(header_block.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in header_block.lower():
        payload = dechunked(payload)
    return Answer(status, payload, b"idempotent-replayed" in header_block.lower())


def dechunked(payload: bytes) -> bytes:
    """An HTTP/1.1 chunked body, joined."""
    body = b""
    while True:
        size_line, _, rest = payload.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return body
        body += rest[:size]
        payload = rest[size + 2 :]
