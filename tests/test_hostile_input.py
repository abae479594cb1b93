"""Hostile input on every service: REST bodies that are not JSON, JSON nested past any sense,
text holding NUL, and errors nobody expected — each a clear error of the protocol in use,
nothing of it in the database, no internals in the answer, and the service keeps serving.

Real `microapp serve` processes on a real PostgreSQL; the unexpected error is injected
in-process at the database seam of a real custom-lang app served by Hypercorn.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from google.protobuf import struct_pb2

from microapp.gen.auth.v1.auth_connect import AuthServiceClient
from microapp.gen.auth.v1.auth_pb2 import RegisterRequest
from microapp.gen.customlang.v1.customlang_connect import CustomLangServiceClient
from microapp.gen.customlang.v1.customlang_pb2 import InvokeRequest
from microapp.gen.gateway.v1.gateway_connect import GatewayServiceClient
from microapp.gen.gateway.v1.gateway_pb2 import InvokeCustomRequest
from microapp.gen.greeter.v1.greeter_connect import GreeterServiceClient
from microapp.gen.greeter.v1.greeter_pb2 import GreetRequest
from microapp.platform.db import Database
from microapp.platform.rest import MAX_JSON_DEPTH, json_nesting
from microapp.platform.validation import field_holding_nul
from microapp.services.customlang.app import CustomLangSettings, create_app
from tests.support.commands import buf_curl
from tests.support.external import ExternalServer
from tests.support.inprocess import serving
from tests.support.polling import eventually
from tests.support.postgres import TestPostgres, query
from tests.support.services import ServiceProcess

SECRET = "secret detail"
NUL_NAME = "hostile\x00name"
NUL_EMAIL = "hostile\x00@example.com"
PASSWORD = "correct horse battery"


@dataclass
class Served:
    """A service process and its database URL (when it has one)."""

    service: ServiceProcess
    database: str

    @property
    def url(self) -> str:
        return self.service.url

    def count(self, table: str, column: str, prefix: str) -> int:
        statement = f"SELECT count(*) FROM {table} WHERE {column} LIKE %s"
        return int(query(self.database, statement, (prefix + "%",))[0][0])


@dataclass
class Fleet:
    greeter: Served
    gateway: Served
    lang: Served
    auth: Served


@pytest.fixture(scope="module")
async def fleet(
    postgres: TestPostgres, external: ExternalServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Fleet]:
    """greeter (with its caller), gateway, custom-lang and auth, each on its own database."""
    databases = {
        name: postgres.fresh_database(f"hostile_{name}")
        for name in ("greeter", "gateway", "lang", "auth")
    }
    key_dir: Path = tmp_path_factory.mktemp("hostile-auth-keys")
    caller = ServiceProcess("caller", {"CALLER_ALLOW_PRIVATE_NETWORKS": "1"})
    lang = ServiceProcess("custom-lang", {"DATABASE_URL": databases["lang"]})
    auth = ServiceProcess(
        "auth", {"DATABASE_URL": databases["auth"], "AUTH_DEV_KEY_DIR": str(key_dir)}
    )
    async with caller, lang, auth:
        greeter = ServiceProcess(
            "greeter",
            {
                "DATABASE_URL": databases["greeter"],
                "CALLER_BASE_URL": caller.url,
                "EXTERNAL_API_URL": external.url(size=10),
            },
        )
        gateway = ServiceProcess(
            "gateway", {"DATABASE_URL": databases["gateway"], "CUSTOM_LANG_BASE_URL": lang.url}
        )
        async with greeter, gateway:
            for service in (greeter, gateway, lang, auth):
                await service.wait_for("/healthz", 200)
            yield Fleet(
                greeter=Served(greeter, databases["greeter"]),
                gateway=Served(gateway, databases["gateway"]),
                lang=Served(lang, databases["lang"]),
                auth=Served(auth, databases["auth"]),
            )


async def _post(
    url: str, body: bytes, content_type: str | None = "application/json"
) -> tuple[int, Any, str]:
    """POST raw bytes; `content_type=None` sends no Content-Type header at all."""
    headers = {} if content_type is None else {"Content-Type": content_type}
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=body, headers=headers, skip_auto_headers=["Content-Type"]) as resp,
    ):
        text = await resp.text()
        return resp.status, json.loads(text), resp.headers.get("Content-Type", "")


def _json(value: object) -> bytes:
    return json.dumps(value).encode()


REST_POSTS = [
    ("auth", "/auth/login"),
    ("auth", "/auth/register"),
    ("lang", "/invoke"),
]


# --- REST: content type, depth, malformed JSON --------------------------------------------


@pytest.mark.parametrize(("service", "path"), REST_POSTS)
@pytest.mark.parametrize(
    "content_type",
    ["text/plain", None, "application/x-www-form-urlencoded", "application/json; charset=latin-1"],
)
async def test_rest_posts_refuse_anything_but_json_with_415(
    fleet: Fleet, service: str, path: str, content_type: str | None
) -> None:
    base = getattr(fleet, service).url
    body = _json({"email": "ada@example.com", "password": PASSWORD, "name": "Ada"})
    status, answer, answered_type = await _post(base + path, body, content_type)
    assert status == 415
    assert answered_type.startswith("application/json")
    assert set(answer) == {"error"}
    assert "application/json" in answer["error"]


@pytest.mark.parametrize("content_type", ["application/json", "Application/JSON; charset=UTF-8"])
async def test_json_with_or_without_a_utf8_charset_is_accepted(
    fleet: Fleet, content_type: str
) -> None:
    status, answer, _ = await _post(
        fleet.lang.url + "/invoke", _json({"name": "Ada"}), content_type
    )
    assert (status, answer) == (200, {"message": "Hello Ada from custom-lang-service!"})


async def test_100000_brackets_to_login_are_400_and_auth_keeps_serving(fleet: Fleet) -> None:
    status, answer, answered_type = await _post(fleet.auth.url + "/auth/login", b"[" * 100_000)
    assert status == 400
    assert answered_type.startswith("application/json")
    assert answer == {"error": f"JSON nested deeper than {MAX_JSON_DEPTH} levels"}
    assert "Traceback" not in json.dumps(answer)
    assert "RecursionError" not in fleet.auth.service.logs()
    # The next request is served as usual: unknown email, 401.
    login = _json({"email": "nobody@example.com", "password": PASSWORD})
    status, answer, _ = await _post(fleet.auth.url + "/auth/login", login)
    assert status == 401


def _nested_email(depth: int) -> bytes:
    """A login body whose total nesting is `depth`: the object plus `depth - 1` arrays."""
    arrays = "[" * (depth - 1) + "]" * (depth - 1)
    return f'{{"email": {arrays}, "password": "x"}}'.encode()


async def test_json_nested_33_levels_is_400_for_its_depth(fleet: Fleet) -> None:
    status, answer, _ = await _post(fleet.auth.url + "/auth/login", _nested_email(33))
    assert (status, answer) == (400, {"error": "JSON nested deeper than 32 levels"})


async def test_json_nested_32_levels_reaches_the_usual_validation(fleet: Fleet) -> None:
    status, answer, _ = await _post(fleet.auth.url + "/auth/login", _nested_email(32))
    assert status == 400
    assert "nested" not in answer["error"]
    assert answer == {"error": "email must be a string"}


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b'{"name": ', "body is not valid JSON"),
        (b"\xff\xfe\x00garbage", "body is not valid JSON"),
        (b'["name"]', "body must be a JSON object"),
        # Only UTF-8: a UTF-16 body could hide an escaped NUL from a byte-level look.
        ('{"name": "x"}'.encode("utf-16"), "body is not valid JSON"),
    ],
)
async def test_malformed_json_is_400(fleet: Fleet, body: bytes, error: str) -> None:
    status, answer, _ = await _post(fleet.lang.url + "/invoke", body)
    assert (status, answer) == (400, {"error": error})


async def test_brackets_inside_strings_do_not_count_as_nesting(fleet: Fleet) -> None:
    name = "[" * 40 + '\\"{'
    status, answer, _ = await _post(fleet.lang.url + "/invoke", _json({"name": name}))
    assert (status, answer) == (200, {"message": f"Hello {name} from custom-lang-service!"})


def test_nesting_is_measured_without_recursion() -> None:
    assert json_nesting({}) == 1
    assert json_nesting({"a": [1, {"b": []}], "c": "[[[["}) == 4
    deep: list[object] = []
    for _ in range(10_000):  # far past the recursion limit; built, not parsed
        deep = [deep]
    assert json_nesting(deep) == 10_001


# --- NUL in text: refused before any database sees it -------------------------------------


async def _connect_error(call: Any) -> ConnectError:
    with pytest.raises(ConnectError) as raised:
        await call
    return raised.value


async def test_nul_in_greet_name_is_invalid_argument_and_stores_nothing(fleet: Fleet) -> None:
    async with GreeterServiceClient(fleet.greeter.url) as client:
        error = await _connect_error(client.greet(GreetRequest(name=NUL_NAME)))
        assert error.code == Code.INVALID_ARGUMENT
        assert error.message == "name must not contain NUL characters"
        after = await client.greet(GreetRequest(name="hostile-after"))
    assert after.message == "Hello hostile-after from greeter-service!"
    assert fleet.greeter.count("greetings", "name", "hostile") == 1  # the one after
    assert "not recorded" not in fleet.greeter.service.logs()


async def test_nul_in_invoke_custom_name_is_invalid_argument_and_stores_nothing(
    fleet: Fleet,
) -> None:
    async with GatewayServiceClient(fleet.gateway.url) as client:
        error = await _connect_error(client.invoke_custom(InvokeCustomRequest(name=NUL_NAME)))
    assert error.code == Code.INVALID_ARGUMENT
    assert "name" in error.message
    assert fleet.gateway.count("invocations", "name", "hostile") == 0
    # Refused at the gateway: custom-lang never saw it either.
    assert fleet.lang.count("executions", "name", "hostile") == 0
    assert "not recorded" not in fleet.gateway.service.logs()


async def test_nul_in_custom_lang_invoke_name_is_invalid_argument(fleet: Fleet) -> None:
    async with CustomLangServiceClient(fleet.lang.url) as client:
        error = await _connect_error(client.invoke(InvokeRequest(name="lang-rpc\x00")))
    assert error.code == Code.INVALID_ARGUMENT
    assert error.message == "name must not contain NUL characters"
    assert fleet.lang.count("executions", "name", "lang-rpc") == 0


async def test_nul_in_rest_invoke_name_is_400_and_stores_nothing(fleet: Fleet) -> None:
    status, answer, _ = await _post(fleet.lang.url + "/invoke", _json({"name": "lang-rest\x00"}))
    assert (status, answer) == (400, {"error": "name must not contain NUL characters"})
    assert fleet.lang.count("executions", "name", "lang-rest") == 0
    assert "not recorded" not in fleet.lang.service.logs()


@pytest.mark.parametrize("path", ["/auth/register", "/auth/login"])
async def test_nul_in_a_rest_email_is_400_and_stores_nothing(fleet: Fleet, path: str) -> None:
    body = _json({"email": NUL_EMAIL, "password": PASSWORD})
    status, answer, _ = await _post(fleet.auth.url + path, body)
    assert status == 400
    assert "email" in answer["error"]
    assert fleet.auth.count("users", "email", "hostile") == 0


async def test_nul_in_a_json_member_name_is_400(fleet: Fleet) -> None:
    status, answer, _ = await _post(fleet.lang.url + "/invoke", _json({"na\x00me": "x"}))
    assert status == 400
    assert "NUL" in answer["error"]


async def test_nul_in_a_connect_email_is_invalid_argument_not_a_database_error(
    fleet: Fleet,
) -> None:
    async with AuthServiceClient(fleet.auth.url) as client:
        request = RegisterRequest(email=NUL_EMAIL, password=PASSWORD)
        error = await _connect_error(client.register(request))
    assert error.code == Code.INVALID_ARGUMENT
    assert "email" in error.message
    assert "PostgreSQL" not in error.message and "0x00" not in error.message
    assert fleet.auth.count("users", "email", "hostile") == 0


def test_nul_is_found_in_nested_repeated_and_map_fields() -> None:
    nested = struct_pb2.Struct()
    nested.update({"outer": {"list": ["fine", "bad\x00"]}})
    assert field_holding_nul(nested) == (
        "fields['outer'].struct_value.fields['list'].list_value.values[1].string_value"
    )
    key = struct_pb2.Struct()
    key.update({"k\x00": 1})
    assert field_holding_nul(key) == "fields key 'k\\x00'"
    clean = struct_pb2.Struct()
    clean.update({"outer": {"list": ["fine", "also fine"]}})
    assert field_holding_nul(clean) is None


# --- unexpected errors: a generic `internal`, the details only in the log -------------------


class BrokenDatabase(Database):
    """A database whose writes fail with an error no handler expects."""

    def __init__(self) -> None:
        super().__init__("postgresql://unused@127.0.0.1:1/unused", [])

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def healthy(self) -> bool:
        return True

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        raise RuntimeError(SECRET)

    async def record(self, insert_sql: str, row: Sequence[Any]) -> None:
        raise RuntimeError(SECRET)


@pytest.fixture
async def broken_lang() -> AsyncIterator[str]:
    """A real custom-lang app, served by Hypercorn in this process, on a broken database."""
    app = create_app(CustomLangSettings.from_env({}), database=BrokenDatabase())
    async with serving(app) as url:
        yield url


def _errors_mentioning(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    formatter = logging.Formatter()
    return [
        record
        for record in caplog.records
        if record.levelno >= logging.ERROR
        and record.exc_info is not None
        and text in formatter.formatException(record.exc_info)
    ]


async def test_an_unexpected_error_in_a_connect_handler_is_a_generic_internal(
    broken_lang: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with CustomLangServiceClient(broken_lang) as client:
        error = await _connect_error(client.invoke(InvokeRequest(name="Ada")))
    assert error.code == Code.INTERNAL
    assert error.message == "internal error"
    assert SECRET not in str(error)
    [logged] = _errors_mentioning(caplog, SECRET)
    assert getattr(logged, "procedure", None) == "/customlang.v1.CustomLangService/Invoke"


async def test_an_unexpected_error_in_a_rest_route_is_a_generic_500(
    broken_lang: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with (
        aiohttp.ClientSession() as session,
        session.post(broken_lang + "/invoke", json={"name": "Ada"}) as resp,
    ):
        status, text = resp.status, await resp.text()
    assert status == 500
    assert json.loads(text) == {"error": "internal error"}
    assert SECRET not in text and "Traceback" not in text
    [logged] = _errors_mentioning(caplog, SECRET)
    assert getattr(logged, "path", None) == "/invoke"


# ---------------------------------------------------------------------------- long URLs


async def test_a_url_over_8192_characters_is_refused_at_once_with_a_short_message(
    tmp_path: Path,
) -> None:
    """A URL near 1 MiB once came back quoted whole: over gRPC a trailer that took the
    server minutes to encode. It is refused before anything else, and quoted short."""
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"url": "http://example.com/" + "a" * 900_000}))
    async with ServiceProcess("caller") as caller:
        answer = await buf_curl(
            caller.url + "/caller.v1.CallerService/CallExternal",
            f"@{request}",
            protocol="grpc",
        )
        assert answer.returncode != 0
        error = json.loads(answer.stderr)
        assert error["code"] == "invalid_argument"
        assert "at most 8192" in error["message"]
        assert len(error["message"]) < 300
        # The longest accepted URL passes validation and is fetched (nothing listens there:
        # unavailable, which is not a length problem).
        longest = "http://127.0.0.1/" + "a" * (8192 - len("http://127.0.0.1/"))
        answer = await buf_curl(
            caller.url + "/caller.v1.CallerService/CallExternal",
            json.dumps({"url": longest}),
            protocol="grpc",
        )
        assert "at most 8192" not in answer.stderr


async def test_a_client_leaving_mid_body_is_no_error(fleet: Fleet) -> None:
    """A client that closes its connection halfway through a REST body is logged as gone,
    not as an unhandled error with a traceback, and the service serves the next call."""
    lang = fleet.lang.service
    _, writer = await asyncio.open_connection("127.0.0.1", lang.port)
    writer.write(
        b"POST /invoke HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b'content-length: 1000\r\n\r\n{"name": "'
    )
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    await eventually(lambda: "client disconnected before its request was read" in lang.logs())
    assert "unhandled error" not in lang.logs()
    status, body, _ = await _post(lang.url + "/invoke", _json({"name": "after"}))
    assert (status, body) == (200, {"message": "Hello after from custom-lang-service!"})


async def _raw_http1(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes as one HTTP/1.1 request; the status, headers and body of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    headers = {k.lower(): v for k, v in headers.items()}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    writer.close()
    return int(lines[0].split()[1]), headers, body


async def test_a_header_that_is_not_utf8_is_invalid_argument_over_connect(fleet: Fleet) -> None:
    """connectrpc decodes headers as UTF-8 before any interceptor: such bytes once came
    back `unknown` with Python's codec error as the message. (A query that is not UTF-8
    never reaches the app over HTTP/1.1: the server's parser refuses it with 400.)"""
    message = json.dumps({"name": "odd"}).encode()
    request = (
        b"POST /customlang.v1.CustomLangService/Invoke HTTP/1.1\r\nhost: x\r\n"
        b"content-type: application/json\r\nx-odd: \xff\xfe\r\n"
        + f"content-length: {len(message)}\r\n\r\n".encode()
        + message
    )
    status, _, body = await _raw_http1(fleet.lang.service.port, request)
    assert status == 400
    assert json.loads(body) == {
        "code": "invalid_argument",
        "message": "request headers and query must be UTF-8",
    }


async def test_a_header_that_is_not_utf8_is_invalid_argument_over_grpc_web(fleet: Fleet) -> None:
    request = (
        b"POST /customlang.v1.CustomLangService/Invoke HTTP/1.1\r\nhost: x\r\n"
        b"content-type: application/grpc-web+proto\r\nx-odd: \xff\r\n"
        b"content-length: 5\r\n\r\n\x00\x00\x00\x00\x00"
    )
    status, headers, _ = await _raw_http1(fleet.lang.service.port, request)
    assert (status, headers["grpc-status"]) == (200, "3")
    assert headers["content-type"] == "application/grpc-web+proto"
