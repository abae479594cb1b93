"""custom-lang end to end: a real `microapp serve custom-lang` process on a real PostgreSQL."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from microapp.gen.customlang.v1.customlang_connect import CustomLangServiceClient
from microapp.gen.customlang.v1.customlang_pb2 import InvokeRequest
from microapp.platform.config import ConfigError
from microapp.services.customlang.rules import DEFAULT_RULES, parse_rules
from tests.support.commands import buf_curl, run
from tests.support.postgres import TestPostgres, query, table_exists
from tests.support.services import ServiceProcess

RULES = {"teapot": 418, "conflict": 200, "broken": 500}

SPECIAL_NAMES = [
    ("unauthorized", 401, Code.UNAUTHENTICATED),
    ("forbidden", 403, Code.PERMISSION_DENIED),
    ("notfound", 404, Code.NOT_FOUND),
    ("ratelimit", 429, Code.RESOURCE_EXHAUSTED),
    ("unavailable", 503, Code.UNAVAILABLE),
]


@dataclass
class CustomLang:
    service: ServiceProcess
    database: str

    async def post(self, body: bytes, content_type: str = "application/json") -> tuple[int, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                self.service.url + "/invoke", data=body, headers={"Content-Type": content_type}
            ) as resp,
        ):
            return resp.status, await resp.json(content_type=None)

    async def invoke_rest(self, name: str) -> tuple[int, Any]:
        return await self.post(json.dumps({"name": name}).encode())

    def executions(self, name: str) -> list[tuple[Any, ...]]:
        return query(
            self.database,
            "SELECT status_code, result_message FROM executions WHERE name = %s"
            " ORDER BY created_at",
            (name,),
        )

    def execution_count(self) -> int:
        return query(self.database, "SELECT count(*) FROM executions")[0][0]


@pytest.fixture(scope="module")
async def lang(postgres: TestPostgres) -> AsyncIterator[CustomLang]:
    database = postgres.fresh_database("lang")
    env = {"DATABASE_URL": database, "LANG_RESPONSE_RULES": json.dumps(RULES)}
    async with ServiceProcess("custom-lang", env) as service:
        await service.wait_for("/healthz", 200)
        yield CustomLang(service, database)


# --- the rules table, read from the environment -------------------------------------


def test_rules_default_to_the_special_names() -> None:
    assert parse_rules("") == {
        "unauthorized": 401,
        "forbidden": 403,
        "notfound": 404,
        "conflict": 409,
        "ratelimit": 429,
        "unavailable": 503,
    }


def test_rules_from_env_are_merged_over_the_defaults() -> None:
    rules = parse_rules('{"teapot": 418, "conflict": 200}')
    assert rules == {**DEFAULT_RULES, "teapot": 418, "conflict": 200}


@pytest.mark.parametrize(
    "raw",
    ['{"x": "503"}', '{"x": 302}', '{"x": 99}', '{"x": true}', '{"x": 503.5}', "[503]", "{x"],
)
def test_a_bad_rules_value_is_a_config_error_naming_the_variable(raw: str) -> None:
    with pytest.raises(ConfigError, match="LANG_RESPONSE_RULES"):
        parse_rules(raw)


async def test_bad_rules_stop_the_service_at_startup_with_a_clear_message() -> None:
    service = ServiceProcess("custom-lang", {"LANG_RESPONSE_RULES": '{"busy": "soon"}'})
    with pytest.raises(RuntimeError, match="exited early"):
        await service.start()
    assert await service.stop() == 2
    assert "LANG_RESPONSE_RULES: the status for 'busy' must be" in service.logs()


# --- REST POST /invoke ----------------------------------------------------------------


async def test_rest_invoke_greets_the_name(lang: CustomLang) -> None:
    assert await lang.invoke_rest("Ada") == (
        200,
        {"message": "Hello Ada from custom-lang-service!"},
    )


async def test_rest_invoke_without_a_name_greets_the_world(lang: CustomLang) -> None:
    status, body = await lang.post(b"{}")
    assert (status, body) == (200, {"message": "Hello World from custom-lang-service!"})


@pytest.mark.parametrize(("name", "status", "code"), SPECIAL_NAMES)
async def test_rest_special_names_answer_their_status_with_an_error(
    lang: CustomLang, name: str, status: int, code: Code
) -> None:
    answered, body = await lang.invoke_rest(name)
    assert answered == status
    assert set(body) == {"error"}
    assert name in body["error"]


async def test_rest_rules_from_env_apply(lang: CustomLang) -> None:
    assert (await lang.invoke_rest("teapot"))[0] == 418
    # "conflict" is 409 by default and 200 in this module's rules.
    assert await lang.invoke_rest("conflict") == (
        200,
        {"message": "Hello conflict from custom-lang-service!"},
    )


async def test_malformed_json_is_400_with_a_json_error(lang: CustomLang) -> None:
    before = lang.execution_count()
    assert await lang.post(b'{"name": "Ada"') == (400, {"error": "body is not valid JSON"})
    assert lang.execution_count() == before


async def test_a_name_that_is_not_a_string_is_400(lang: CustomLang) -> None:
    assert await lang.post(b'{"name": 42}') == (400, {"error": "name must be a string"})


async def test_a_body_over_1_mib_is_rejected_with_413(lang: CustomLang) -> None:
    body = json.dumps({"name": "x" * (1024 * 1024)}).encode()
    status, answer = await lang.post(body)
    assert status == 413
    assert "error" in answer
    assert await lang.invoke_rest("after the big body") == (
        200,
        {"message": "Hello after the big body from custom-lang-service!"},
    )


async def test_a_body_that_is_not_json_content_is_415(lang: CustomLang) -> None:
    status, answer = await lang.post(b"name=Ada", "application/x-www-form-urlencoded")
    assert (status, set(answer)) == (415, {"error"})


async def test_a_name_over_255_characters_is_400_and_recorded_cut(lang: CustomLang) -> None:
    name = "n" * 300
    status, answer = await lang.invoke_rest(name)
    assert (status, answer) == (400, {"error": "name must be at most 255 characters"})
    assert lang.executions(name[:255]) == [(400, "name must be at most 255 characters")]


# --- Connect customlang.v1.CustomLangService/Invoke -----------------------------------


async def test_connect_invoke_greets_the_name(lang: CustomLang) -> None:
    async with CustomLangServiceClient(lang.service.url) as client:
        response = await client.invoke(InvokeRequest(name="Grace"))
    assert response.message == "Hello Grace from custom-lang-service!"


@pytest.mark.parametrize(
    ("name", "code"),
    [(name, code) for name, _, code in SPECIAL_NAMES]
    + [("teapot", Code.UNKNOWN), ("broken", Code.INTERNAL)],
)
async def test_connect_invoke_maps_statuses_to_codes(lang: CustomLang, name: str, code: Code):
    async with CustomLangServiceClient(lang.service.url) as client:
        with pytest.raises(ConnectError) as caught:
            await client.invoke(InvokeRequest(name=name))
    assert caught.value.code == code


async def test_buf_curl_invokes_through_reflection(lang: CustomLang) -> None:
    result = await buf_curl(
        f"{lang.service.url}/customlang.v1.CustomLangService/Invoke", '{"name": "Buf"}'
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"message": "Hello Buf from custom-lang-service!"}


# --- executions -----------------------------------------------------------------------


async def test_every_rest_call_is_an_execution_row_before_the_answer(lang: CustomLang) -> None:
    await lang.invoke_rest("row-rest")
    await lang.invoke_rest("forbidden")
    assert lang.executions("row-rest") == [(200, "Hello row-rest from custom-lang-service!")]
    assert lang.executions("forbidden")[-1][0] == 403


async def test_every_connect_call_is_an_execution_row_before_the_answer(lang: CustomLang) -> None:
    async with CustomLangServiceClient(lang.service.url) as client:
        await client.invoke(InvokeRequest(name="row-connect"))
        before = len(lang.executions("notfound"))
        with pytest.raises(ConnectError):
            await client.invoke(InvokeRequest(name="notfound"))
    assert lang.executions("row-connect") == [(200, "Hello row-connect from custom-lang-service!")]
    assert len(lang.executions("notfound")) == before + 1


async def test_a_wildcard_rule_answers_every_other_name(postgres: TestPostgres) -> None:
    env = {"LANG_RESPONSE_RULES": '{"*": 503, "healthy": 200}'}
    async with ServiceProcess("custom-lang", env) as service:
        lang = CustomLang(service, "")
        assert (await lang.invoke_rest("anyone"))[0] == 503
        assert (await lang.invoke_rest("forbidden"))[0] == 403
        assert (await lang.invoke_rest("healthy"))[0] == 200


async def test_migrate_command_creates_the_executions_table(postgres: TestPostgres) -> None:
    database = postgres.fresh_database("langmig")
    result = await run(
        sys.executable, "-m", "microapp", "migrate", "custom-lang", "--database-url", database
    )
    assert result.returncode == 0, result.stderr
    assert table_exists(database, "executions")
