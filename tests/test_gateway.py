"""gateway → custom-lang end to end: real processes, real PostgreSQL, real failures.

The breaker and retry budget rules themselves are pinned exactly by test_breaker.py and
test_retry_budget.py on an injected clock; these tests show them at work in the service:
each attempt (a call, and its retry) is one breaker outcome, as in the seed.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from microapp.gen.gateway.v1.gateway_connect import GatewayServiceClient
from microapp.gen.gateway.v1.gateway_pb2 import InvokeCustomRequest
from microapp.platform.config import ConfigError
from microapp.services.gateway.app import GatewaySettings
from tests.support.commands import buf_curl, run
from tests.support.external import ExternalServer
from tests.support.jwt import token_from_auth
from tests.support.otlp import OtlpReceiver
from tests.support.polling import eventually
from tests.support.postgres import TestPostgres, query, table_exists
from tests.support.services import ServiceProcess

# Beside the special names, statuses that complete the gateway's mapping table.
LANG_RULES = {"invalid": 400, "teapot": 418, "broken": 500, "badgateway": 502, "slowgw": 504}

MAPPED_NAMES = [
    ("invalid", Code.INVALID_ARGUMENT),
    ("unauthorized", Code.UNAUTHENTICATED),
    ("forbidden", Code.PERMISSION_DENIED),
    ("notfound", Code.NOT_FOUND),
    ("conflict", Code.ALREADY_EXISTS),
    ("ratelimit", Code.RESOURCE_EXHAUSTED),
    ("teapot", Code.UNKNOWN),
    ("broken", Code.INTERNAL),
    ("badgateway", Code.UNAVAILABLE),
    ("unavailable", Code.UNAVAILABLE),
    ("slowgw", Code.DEADLINE_EXCEEDED),
]


@dataclass
class Lang:
    service: ServiceProcess
    database: str

    def executions(self, name: str | None = None) -> int:
        if name is None:
            return query(self.database, "SELECT count(*) FROM executions")[0][0]
        return query(self.database, "SELECT count(*) FROM executions WHERE name = %s", (name,))[0][
            0
        ]


@dataclass
class Gateway:
    service: ServiceProcess
    database: str | None = None

    @property
    def url(self) -> str:
        return self.service.url

    async def invoke(self, name: str, *, timeout_ms: int | None = None) -> str:
        async with GatewayServiceClient(self.url) as client:
            response = await client.invoke_custom(
                InvokeCustomRequest(name=name), timeout_ms=timeout_ms
            )
        return response.message

    async def invoke_error(self, name: str, *, timeout_ms: int | None = None) -> ConnectError:
        with pytest.raises(ConnectError) as caught:
            await self.invoke(name, timeout_ms=timeout_ms)
        return caught.value

    async def breaker(self) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.url + "/debug/breaker") as resp,
        ):
            assert resp.status == 200
            return await resp.json()

    def invocations(self, name: str) -> list[tuple[Any, ...]]:
        assert self.database is not None
        return query(
            self.database,
            "SELECT success, result_message FROM invocations WHERE name = %s ORDER BY created_at",
            (name,),
        )


@pytest.fixture(scope="module")
async def lang(postgres: TestPostgres) -> AsyncIterator[Lang]:
    database = postgres.fresh_database("gwlang")
    env = {"DATABASE_URL": database, "LANG_RESPONSE_RULES": json.dumps(LANG_RULES)}
    async with ServiceProcess("custom-lang", env) as service:
        await service.wait_for("/healthz", 200)
        yield Lang(service, database)


@pytest.fixture(scope="module")
async def gateway(postgres: TestPostgres, lang: Lang) -> AsyncIterator[Gateway]:
    """A gateway whose breaker never opens, so that outcomes are independent of order."""
    database = postgres.fresh_database("gateway")
    env = {
        "DATABASE_URL": database,
        "CUSTOM_LANG_BASE_URL": lang.service.url,
        "GATEWAY_BREAKER_FAILURES": "1000000",
    }
    async with ServiceProcess("gateway", env) as service:
        await service.wait_for("/healthz", 200)
        yield Gateway(service, database)


def breaker_env(lang_url: str, **settings: str) -> dict[str, str]:
    # Default retry budget (full): an invocation answered 503 is two attempts, two failures.
    return {"CUSTOM_LANG_BASE_URL": lang_url, **settings}


# --- answers and their Connect codes ---------------------------------------------------


async def test_invoke_custom_answers_custom_langs_greeting(gateway: Gateway) -> None:
    assert await gateway.invoke("Ada") == "Hello Ada from custom-lang-service!"


async def test_empty_name_invokes_for_the_world(gateway: Gateway) -> None:
    assert await gateway.invoke("") == "Hello World from custom-lang-service!"


@pytest.mark.parametrize(("name", "code"), MAPPED_NAMES)
async def test_each_special_name_yields_its_mapped_connect_code(
    gateway: Gateway, name: str, code: Code
) -> None:
    error = await gateway.invoke_error(name)
    assert error.code == code
    assert name in error.message


async def test_buf_curl_invokes_through_reflection(gateway: Gateway) -> None:
    result = await buf_curl(f"{gateway.url}/gateway.v1.GatewayService/InvokeCustom", '{"name":"B"}')
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"message": "Hello B from custom-lang-service!"}


async def test_name_over_255_characters_is_invalid_argument_without_calling(
    gateway: Gateway, lang: Lang
) -> None:
    before = lang.executions()
    error = await gateway.invoke_error("g" * 256)
    assert error.code == Code.INVALID_ARGUMENT
    assert lang.executions() == before


async def test_a_request_over_1_mib_is_rejected(gateway: Gateway, lang: Lang) -> None:
    before = lang.executions()
    body = json.dumps({"name": "x" * (1024 * 1024)})
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gateway.url + "/gateway.v1.GatewayService/InvokeCustom",
            data=body,
            headers={"Content-Type": "application/json"},
        ) as resp,
    ):
        assert resp.status != 200
        assert (await resp.json())["code"] == "resource_exhausted"
    assert lang.executions() == before
    assert await gateway.invoke("after") == "Hello after from custom-lang-service!"


async def test_malformed_connect_json_is_invalid_argument(gateway: Gateway) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gateway.url + "/gateway.v1.GatewayService/InvokeCustom",
            data=b'{"name": ',
            headers={"Content-Type": "application/json"},
        ) as resp,
    ):
        assert (await resp.json())["code"] == "invalid_argument"


# --- rows: invocations at the gateway, executions at custom-lang ------------------------


async def test_a_success_is_an_invocation_row(gateway: Gateway) -> None:
    await gateway.invoke("row-ok")
    assert gateway.invocations("row-ok") == [(True, "Hello row-ok from custom-lang-service!")]


@pytest.mark.parametrize("name", ["notfound", "unavailable", "broken"])
async def test_a_failure_is_an_invocation_row(gateway: Gateway, name: str) -> None:
    before = len(gateway.invocations(name))
    error = await gateway.invoke_error(name)
    rows = gateway.invocations(name)
    assert len(rows) == before + 1
    assert rows[-1] == (False, error.message)


async def test_an_invalid_argument_is_an_invocation_row(gateway: Gateway) -> None:
    await gateway.invoke_error("r" * 300)
    assert gateway.invocations("r" * 255) == [
        (False, "name must be at most 255 characters"),
    ]


async def test_a_retryable_failure_is_retried_once_never_more(gateway: Gateway, lang: Lang) -> None:
    for name in ("unavailable", "ratelimit", "badgateway", "slowgw"):
        before = lang.executions(name)
        await gateway.invoke_error(name)
        assert lang.executions(name) == before + 2, name


@pytest.mark.parametrize("name", ["notfound", "broken", "teapot"])
async def test_a_non_retryable_answer_is_sent_once(gateway: Gateway, lang: Lang, name: str):
    before = lang.executions(name)
    await gateway.invoke_error(name)
    assert lang.executions(name) == before + 1


async def test_debug_breaker_reports_state_failures_and_tokens(lang: Lang) -> None:
    env = {"CUSTOM_LANG_BASE_URL": lang.service.url}
    async with ServiceProcess("gateway", env) as service:
        gateway = Gateway(service)
        assert await gateway.breaker() == {
            "state": "closed",
            "consecutive_failures": 0,
            "retry_tokens": 20,
        }
        await gateway.invoke_error("unavailable")  # the call and its retry: two failures
        report = await gateway.breaker()
    assert report["state"] == "closed"
    assert report["consecutive_failures"] == 2
    assert report["retry_tokens"] in (19, 20)  # one spent; refill may have given it back


async def get_breaker(url: str, token: str | None = None) -> tuple[int, dict[str, Any], str]:
    """`GET url` (a /debug/breaker), with a bearer token if given: status, JSON body and
    the WWW-Authenticate header."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as resp:
        return resp.status, await resp.json(), resp.headers.get("WWW-Authenticate", "")


@pytest.fixture(scope="module")
async def auth(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ServiceProcess]:
    """A real auth process (development logins, no database) that signs the tokens."""
    env = {"AUTH_DEV_KEY_DIR": str(tmp_path_factory.mktemp("gw-keys")), "AUTH_DEV_MODE": "1"}
    async with ServiceProcess("auth", env) as service:
        yield service


async def test_debug_breaker_requires_a_token_when_auth_is_required(
    lang: Lang, auth: ServiceProcess
) -> None:
    env = {
        "CUSTOM_LANG_BASE_URL": lang.service.url,
        "AUTH_REQUIRED": "1",
        "AUTH_JWKS_URL": auth.url + "/.well-known/jwks.json",
    }
    token = await token_from_auth(auth.url, "operator@example.org")
    async with ServiceProcess("gateway", env) as gateway:
        url = gateway.url + "/debug/breaker"
        status, body, challenge = await get_breaker(url)
        assert (status, challenge) == (401, "Bearer")
        assert body == {"error": "missing bearer token"}
        status, body, _ = await get_breaker(url, "not.a.token")
        assert status == 401
        assert set(body) == {"error"}
        status, body, _ = await get_breaker(url, token)
        assert status == 200
        assert body == {"state": "closed", "consecutive_failures": 0, "retry_tokens": 20}

        # The web service's relay (one origin, as behind Traefik) passes the browser's
        # Authorization header on: the gateway decides, and the relay adds no token itself.
        relay_env = {"WEB_BREAKER_UPSTREAM_URL": url}
        async with ServiceProcess("web", relay_env) as web:
            status, body, challenge = await get_breaker(web.url + "/debug/breaker")
            assert (status, challenge) == (401, "Bearer")
            assert body == {"error": "missing bearer token"}
            status, body, _ = await get_breaker(web.url + "/debug/breaker", token)
            assert status == 200
            assert body["state"] == "closed"


async def test_debug_breaker_stays_open_without_auth_required(lang: Lang) -> None:
    async with ServiceProcess("gateway", {"CUSTOM_LANG_BASE_URL": lang.service.url}) as gateway:
        status, body, _ = await get_breaker(gateway.url + "/debug/breaker")
    assert status == 200
    assert body["state"] == "closed"


# --- the circuit breaker at work ---------------------------------------------------------


async def test_a_503_opens_the_breaker_on_the_third_invocation(lang: Lang) -> None:
    # A full budget that does not refill, so the tokens spent can be counted exactly.
    env = breaker_env(lang.service.url, GATEWAY_RETRY_REFILL_PER_S="0")
    async with ServiceProcess("gateway", env) as service:
        gateway = Gateway(service)
        before = lang.executions("unavailable")
        for failures in (2, 4):  # each invocation: the call and its retry, two failures
            assert (await gateway.invoke_error("unavailable")).code == Code.UNAVAILABLE
            report = await gateway.breaker()
            assert (report["state"], report["consecutive_failures"]) == ("closed", failures)
        assert lang.executions("unavailable") == before + 4

        # The third invocation's first attempt is the fifth failure: the breaker opens and
        # refuses the retry, so custom-lang's 503 is the answer and is sent only once.
        third = await gateway.invoke_error("unavailable")
        assert third.code == Code.UNAVAILABLE
        assert "circuit breaker" not in third.message
        assert lang.executions("unavailable") == before + 5
        report = await gateway.breaker()
        assert report["state"] == "open"
        assert report["retry_tokens"] == 18  # two retries sent; none for the refused one

        ada_before = lang.executions("Ada")
        fourth = await gateway.invoke_error("unavailable")
        also_good_names = await gateway.invoke_error("Ada")

    assert fourth.code == Code.UNAVAILABLE
    assert "circuit breaker is open" in fourth.message
    assert also_good_names.code == Code.UNAVAILABLE
    assert lang.executions("unavailable") == before + 5
    assert lang.executions("Ada") == ada_before


async def test_four_failed_attempts_and_a_success_keep_it_closed(lang: Lang) -> None:
    async with ServiceProcess("gateway", breaker_env(lang.service.url)) as service:
        gateway = Gateway(service)
        for _ in range(2):  # two invocations, four failed attempts
            await gateway.invoke_error("unavailable")
        await gateway.invoke("Ada")
        for _ in range(2):
            await gateway.invoke_error("unavailable")
        report = await gateway.breaker()
        assert (report["state"], report["consecutive_failures"]) == ("closed", 4)


async def test_4xx_answers_never_open_it(lang: Lang) -> None:
    async with ServiceProcess("gateway", breaker_env(lang.service.url)) as service:
        gateway = Gateway(service)
        for name in ["notfound", "forbidden", "unauthorized", "conflict", "invalid"] * 2:
            await gateway.invoke_error(name)
        assert await gateway.breaker() == {
            "state": "closed",
            "consecutive_failures": 0,
            "retry_tokens": 20,  # answers are never retried
        }


async def test_after_the_open_period_good_calls_close_it_again(lang: Lang) -> None:
    env = breaker_env(lang.service.url, GATEWAY_BREAKER_OPEN_S="1")
    async with ServiceProcess("gateway", env) as service:
        gateway = Gateway(service)
        for _ in range(3):
            await gateway.invoke_error("unavailable")
        assert (await gateway.breaker())["state"] == "open"

        async def half_open() -> bool:
            return (await gateway.breaker())["state"] == "half_open"

        await eventually(half_open)
        # Each good invocation is one attempt, one of the three trial successes.
        assert await gateway.invoke("Ada") == "Hello Ada from custom-lang-service!"
        assert (await gateway.breaker())["state"] == "half_open"  # 1 of 3 trial successes
        await gateway.invoke("Ada")
        await gateway.invoke("Ada")
        assert (await gateway.breaker())["state"] == "closed"
        assert "circuit breaker custom-lang closed" in service.logs()


async def test_a_failed_trial_call_opens_it_again(lang: Lang) -> None:
    env = breaker_env(lang.service.url, GATEWAY_BREAKER_OPEN_S="1", GATEWAY_RETRY_REFILL_PER_S="0")
    async with ServiceProcess("gateway", env) as service:
        gateway = Gateway(service)
        for _ in range(3):
            await gateway.invoke_error("unavailable")

        async def half_open() -> bool:
            return (await gateway.breaker())["state"] == "half_open"

        await eventually(half_open)
        before = lang.executions("unavailable")
        error = await gateway.invoke_error("unavailable")
        # The trial attempt failed and reopened the breaker, which refuses its retry: one
        # attempt reached custom-lang, and custom-lang's own 503 is the answer.
        assert lang.executions("unavailable") == before + 1
        assert "circuit breaker" not in error.message
        report = await gateway.breaker()
        assert report["state"] == "open"
        assert report["retry_tokens"] == 18  # the first two retries; none for the trial's


async def test_breaker_state_changes_are_logged(lang: Lang) -> None:
    async with ServiceProcess("gateway", breaker_env(lang.service.url)) as service:
        gateway = Gateway(service)
        for _ in range(4):  # the third opens it, the fourth is refused
            await gateway.invoke_error("unavailable")
        logs = service.logs()
    opened = [json.loads(line) for line in logs.splitlines() if '"to_state": "open"' in line]
    assert len(opened) == 1
    assert opened[0]["level"] == "WARNING"
    assert opened[0]["from_state"] == "closed"


async def test_gauges_read_on_the_exporters_thread_do_not_move_the_breaker(lang: Lang) -> None:
    # The exporter reads the gauges on its own thread every 300 ms. Once the open period is
    # over they report half-open (what the next call meets) while the breaker itself stays
    # open: the transition, and its log line, come only with the next call.
    receiver = OtlpReceiver()
    await receiver.start()
    env = breaker_env(
        lang.service.url,
        GATEWAY_BREAKER_OPEN_S="1",
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
        OTEL_METRIC_EXPORT_INTERVAL="300",
    )
    try:
        async with ServiceProcess("gateway", env) as service:
            gateway = Gateway(service)
            for _ in range(3):
                await gateway.invoke_error("unavailable")

            def state_gauge() -> float | None:
                return receiver.metric_values.get("microapp.breaker.state")

            await eventually(lambda: state_gauge() == 2)  # open
            await eventually(lambda: state_gauge() == 1)  # half-open, as read
            assert (await gateway.breaker())["state"] == "half_open"
            assert "circuit breaker custom-lang half_open" not in service.logs()

            await gateway.invoke("Ada")  # the call that meets the breaker moves it
            assert "circuit breaker custom-lang half_open" in service.logs()
    finally:
        await receiver.close()


# --- custom-lang down, slow, and a retry storm ------------------------------------------


async def test_custom_lang_down_is_unavailable_at_once_and_gateway_keeps_serving(
    postgres: TestPostgres,
) -> None:
    later = ServiceProcess("custom-lang", {})  # its port is chosen, nothing listens yet
    env = breaker_env(later.url, GATEWAY_BREAKER_OPEN_S="1", GATEWAY_ATTEMPT_TIMEOUT_S="10")
    async with ServiceProcess("gateway", env) as service:
        gateway = Gateway(service)
        # A refused connection is answered at once, not after the 10 s attempt timeout.
        error = await gateway.invoke_error("Ada", timeout_ms=5000)
        assert error.code == Code.UNAVAILABLE
        assert "unreachable" in error.message
        for _ in range(5):
            await gateway.invoke_error("Ada", timeout_ms=5000)
        assert (await gateway.breaker())["state"] == "open"
        await service.wait_for("/healthz", 200)

        async with later:

            async def served() -> bool:
                try:
                    return await gateway.invoke("Ada") == "Hello Ada from custom-lang-service!"
                except ConnectError:
                    return False

            assert await eventually(served)


async def test_a_timeout_is_deadline_exceeded_after_one_retry() -> None:
    async with ExternalServer() as slow:
        slow.hold("/invoke")  # answers no attempt within its timeout
        env = {"CUSTOM_LANG_BASE_URL": slow.base_url, "GATEWAY_ATTEMPT_TIMEOUT_S": "0.3"}
        async with ServiceProcess("gateway", env) as service:
            gateway = Gateway(service)
            error = await gateway.invoke_error("patient")
            report = await gateway.breaker()
    assert error.code == Code.DEADLINE_EXCEEDED
    assert slow.requests == 2  # a timed-out attempt is retried (the seed never does)
    assert report["consecutive_failures"] == 2  # two attempts, two breaker outcomes


async def test_a_retry_storm_is_bounded_by_the_budget(postgres: TestPostgres) -> None:
    lang_db = postgres.fresh_database("stormlang")
    gateway_db = postgres.fresh_database("stormgw")
    lang_env = {"DATABASE_URL": lang_db, "LANG_RESPONSE_RULES": '{"*": 503}'}
    async with ServiceProcess("custom-lang", lang_env) as lang_service:
        await lang_service.wait_for("/healthz", 200)
        env = {
            "DATABASE_URL": gateway_db,
            "CUSTOM_LANG_BASE_URL": lang_service.url,
            # Keep the breaker closed: what is measured is retries, not fail-fast.
            "GATEWAY_BREAKER_FAILURES": "1000000",
            # A loaded 2-core machine must not turn 503s into attempt timeouts.
            "GATEWAY_ATTEMPT_TIMEOUT_S": "5",
        }
        async with ServiceProcess("gateway", env) as service:
            await service.wait_for("/healthz", 200)
            calls, elapsed = await storm(service.url, callers=200, seconds=3.0)

    lang = Lang(lang_service, lang_db)
    invocations = query(gateway_db, "SELECT count(*) FROM invocations")[0][0]
    assert invocations == calls  # every call reached the gateway and was recorded
    retries = lang.executions() - invocations
    assert retries <= 20 + 10 * elapsed, (retries, calls, elapsed)
    assert retries >= 20  # the budget was spent, so an unbounded retrier would show


async def storm(url: str, *, callers: int, seconds: float) -> tuple[int, float]:
    """`callers` concurrent loops calling InvokeCustom until `seconds` have passed.

    Returns the number of calls answered and the seconds from the first call sent to the
    last answer received.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + seconds
    answered = 0

    async def caller(client: GatewayServiceClient) -> None:
        nonlocal answered
        while loop.time() < deadline:
            try:
                await client.invoke_custom(InvokeCustomRequest(name="storm"), timeout_ms=10_000)
            except ConnectError as exc:
                assert exc.code == Code.UNAVAILABLE, exc
            answered += 1

    async with GatewayServiceClient(url) as client:
        await asyncio.gather(*(caller(client) for _ in range(callers)))
    return answered, loop.time() - started


# --- configuration and migrations ---------------------------------------------------------


def test_settings_default_to_the_seeds_numbers() -> None:
    settings = GatewaySettings.from_env({})
    assert (
        settings.custom_lang_base_url,
        settings.attempt_timeout_s,
        settings.breaker_failures,
        settings.breaker_interval_s,
        settings.breaker_open_s,
        settings.breaker_half_open_requests,
        settings.retry_capacity,
        settings.retry_refill_per_s,
    ) == ("http://127.0.0.1:3000", 1.0, 5, 10.0, 30.0, 3, 20, 10.0)


def test_every_number_is_read_from_the_environment() -> None:
    settings = GatewaySettings.from_env(
        {
            "CUSTOM_LANG_BASE_URL": "http://lang:3000/",
            "GATEWAY_ATTEMPT_TIMEOUT_S": "2.5",
            "GATEWAY_BREAKER_FAILURES": "7",
            "GATEWAY_BREAKER_INTERVAL_S": "20",
            "GATEWAY_BREAKER_OPEN_S": "5",
            "GATEWAY_BREAKER_HALF_OPEN_REQUESTS": "2",
            "GATEWAY_RETRY_CAPACITY": "40",
            "GATEWAY_RETRY_REFILL_PER_S": "0.5",
        }
    )
    assert (
        settings.custom_lang_base_url,
        settings.attempt_timeout_s,
        settings.breaker_failures,
        settings.breaker_interval_s,
        settings.breaker_open_s,
        settings.breaker_half_open_requests,
        settings.retry_capacity,
        settings.retry_refill_per_s,
    ) == ("http://lang:3000", 2.5, 7, 20.0, 5.0, 2, 40, 0.5)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("GATEWAY_BREAKER_FAILURES", "0"),
        ("GATEWAY_BREAKER_HALF_OPEN_REQUESTS", "0"),
        ("GATEWAY_RETRY_CAPACITY", "-1"),
        ("GATEWAY_BREAKER_OPEN_S", "soon"),
        ("GATEWAY_ATTEMPT_TIMEOUT_S", "0"),
        ("CUSTOM_LANG_BASE_URL", "lang:3000"),
    ],
)
def test_a_bad_setting_is_a_config_error_naming_it(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        GatewaySettings.from_env({variable: value})


async def test_migrate_command_creates_the_invocations_table(postgres: TestPostgres) -> None:
    database = postgres.fresh_database("gwmig")
    result = await run(
        sys.executable, "-m", "microapp", "migrate", "gateway", "--database-url", database
    )
    assert result.returncode == 0, result.stderr
    assert table_exists(database, "invocations")
