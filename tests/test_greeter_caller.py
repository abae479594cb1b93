"""greeter → caller → external, end to end: real Hypercorn processes, real PostgreSQL."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import quote

import aiohttp
import pytest
from connectrpc.code import Code
from connectrpc.compat import google_protobuf_json_codec
from connectrpc.errors import ConnectError

from microapp.gen.caller.v1.caller_connect import CallerServiceClient
from microapp.gen.caller.v1.caller_pb2 import CallExternalRequest
from microapp.gen.greeter.v1.greeter_connect import GreeterServiceClient
from microapp.gen.greeter.v1.greeter_pb2 import GreetRequest
from tests.support.commands import buf_curl, run
from tests.support.external import ExternalServer
from tests.support.polling import eventually
from tests.support.ports import free_port
from tests.support.postgres import TestPostgres, query
from tests.support.services import ServiceProcess

EXTERNAL_BODY = 1234


@dataclass
class Stack:
    greeter: ServiceProcess
    caller: ServiceProcess
    greeter_db: str
    caller_db: str
    external: ExternalServer


@pytest.fixture(scope="module")
async def stack(postgres: TestPostgres, external: ExternalServer) -> AsyncIterator[Stack]:
    greeter_db = postgres.fresh_database("greeter")
    caller_db = postgres.fresh_database("caller")
    caller = ServiceProcess("caller", {"DATABASE_URL": caller_db, "CALLER_EXTERNAL_TIMEOUT_S": "1"})
    async with caller:
        greeter = ServiceProcess(
            "greeter",
            {
                "DATABASE_URL": greeter_db,
                "CALLER_BASE_URL": caller.url,
                "EXTERNAL_API_URL": external.url(status=200, size=EXTERNAL_BODY),
            },
        )
        async with greeter:
            await greeter.wait_for("/healthz", 200)
            await caller.wait_for("/healthz", 200)
            yield Stack(greeter, caller, greeter_db, caller_db, external)


async def test_greet_answers_greeting_with_external_status_and_body_length(stack: Stack) -> None:
    async with GreeterServiceClient(stack.greeter.url) as client:
        response = await client.greet(GreetRequest(name="Ada"))
    assert response.message == "Hello Ada from greeter-service!"
    assert response.external_status == 200
    assert response.external_body_length == EXTERNAL_BODY


async def test_empty_name_greets_the_world(stack: Stack) -> None:
    async with GreeterServiceClient(stack.greeter.url, codec=google_protobuf_json_codec()) as c:
        response = await c.greet(GreetRequest())
    assert response.message == "Hello World from greeter-service!"


@pytest.mark.parametrize("protocol", ["connect", "grpc", "grpcweb"])
async def test_buf_curl_greets_over_h2c_through_reflection(stack: Stack, protocol: str) -> None:
    result = await buf_curl(
        f"{stack.greeter.url}/greeter.v1.GreeterService/Greet", '{"name": "Buf"}', protocol=protocol
    )
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body == {
        "message": "Hello Buf from greeter-service!",
        "externalStatus": 200,
        "externalBodyLength": EXTERNAL_BODY,
    }


async def test_connect_get_greets(stack: Stack) -> None:
    message = quote(json.dumps({"name": "Getter"}))
    url = (
        f"{stack.greeter.url}/greeter.v1.GreeterService/Greet"
        f"?encoding=json&message={message}&connect=v1"
    )
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["message"] == "Hello Getter from greeter-service!"
    assert body["externalStatus"] == 200


async def test_greeting_row_exists_when_the_response_arrives(stack: Stack) -> None:
    name = "Row Checker"
    async with GreeterServiceClient(stack.greeter.url) as client:
        await client.greet(GreetRequest(name=name))
    rows = query(
        stack.greeter_db,
        "SELECT message, external_status FROM greetings WHERE name = %s",
        (name,),
    )
    assert rows == [("Hello Row Checker from greeter-service!", 200)]


async def test_call_log_row_appears_shortly_after_the_response(stack: Stack) -> None:
    url = stack.external.url(status=203, size=77)
    async with CallerServiceClient(stack.caller.url) as client:
        response = await client.call_external(CallExternalRequest(url=url))
    assert (response.status_code, response.body_length) == (203, 77)

    def logged() -> list[tuple[object, ...]]:
        return query(
            stack.caller_db, "SELECT status_code, body_length FROM call_logs WHERE url = %s", (url,)
        )

    assert await eventually(logged) == [(203, 77)]


async def test_any_external_status_is_a_successful_result(stack: Stack) -> None:
    async with CallerServiceClient(stack.caller.url) as client:
        for status in (404, 500, 503):
            response = await client.call_external(
                CallExternalRequest(url=stack.external.url(status=status, size=3))
            )
            assert (response.status_code, response.body_length) == (status, 3)


async def test_large_external_body_is_counted(stack: Stack) -> None:
    size = 8 * 1024 * 1024 + 17
    async with CallerServiceClient(stack.caller.url) as client:
        response = await client.call_external(
            CallExternalRequest(url=stack.external.url(size=size))
        )
    assert response.body_length == size


@pytest.mark.parametrize(
    "url",
    ["", "not a url", "ftp://example.com/file", "/relative/path", "http://", "http://x:99999/"],
)
async def test_invalid_url_is_invalid_argument(stack: Stack, url: str) -> None:
    async with CallerServiceClient(stack.caller.url) as client:
        with pytest.raises(ConnectError) as caught:
            await client.call_external(CallExternalRequest(url=url))
    assert caught.value.code == Code.INVALID_ARGUMENT


async def test_name_of_256_characters_is_invalid_argument(stack: Stack) -> None:
    async with GreeterServiceClient(stack.greeter.url) as client:
        ok = await client.greet(GreetRequest(name="a" * 255))
        assert ok.message.startswith("Hello aaa")
        with pytest.raises(ConnectError) as caught:
            await client.greet(GreetRequest(name="a" * 256))
    assert caught.value.code == Code.INVALID_ARGUMENT


async def test_external_timeout_is_deadline_exceeded(stack: Stack) -> None:
    # caller runs with a 1 s external timeout in this module.
    async with CallerServiceClient(stack.caller.url) as client:
        with pytest.raises(ConnectError) as caught:
            await client.call_external(CallExternalRequest(url=stack.external.url(delay=3)))
    assert caught.value.code == Code.DEADLINE_EXCEEDED


async def test_greeter_passes_the_callers_deadline_exceeded_through(stack: Stack) -> None:
    env = {"CALLER_BASE_URL": stack.caller.url, "EXTERNAL_API_URL": stack.external.url(delay=3)}
    async with ServiceProcess("greeter", env) as greeter, GreeterServiceClient(greeter.url) as c:
        with pytest.raises(ConnectError) as caught:
            await c.greet(GreetRequest(name="slow"))
    assert caught.value.code == Code.DEADLINE_EXCEEDED


async def test_greeter_gives_the_caller_two_seconds(external: ExternalServer) -> None:
    # The caller would wait 10 s for an external answer that takes 3 s; had the greeter
    # no deadline of its own, the greeting would succeed.
    async with ServiceProcess("caller", {"CALLER_EXTERNAL_TIMEOUT_S": "10"}) as caller:
        env = {"CALLER_BASE_URL": caller.url, "EXTERNAL_API_URL": external.url(delay=3)}
        async with (
            ServiceProcess("greeter", env) as greeter,
            GreeterServiceClient(greeter.url) as c,
        ):
            with pytest.raises(ConnectError) as caught:
                await c.greet(GreetRequest(name="patient"))
    assert caught.value.code == Code.DEADLINE_EXCEEDED


async def test_a_deadline_the_client_sent_ends_the_greeting_as_deadline_exceeded(
    external: ExternalServer,
) -> None:
    """The client allows 0.5 s (Connect-Timeout-Ms) but waits longer itself, so greeter's
    deadline fires first, cancelling its call to caller. The answer is deadline_exceeded,
    not the client library's CANCELED for the call greeter gave up on."""
    async with ServiceProcess("caller", {"CALLER_EXTERNAL_TIMEOUT_S": "10"}) as caller:
        env = {"CALLER_BASE_URL": caller.url, "EXTERNAL_API_URL": external.url(delay=3)}
        async with ServiceProcess("greeter", env) as greeter, aiohttp.ClientSession() as http:
            headers = {"Content-Type": "application/json", "Connect-Timeout-Ms": "500"}
            url = greeter.url + "/greeter.v1.GreeterService/Greet"
            async with http.post(url, json={"name": "hurried"}, headers=headers) as resp:
                body = await resp.json()
    assert body["code"] == "deadline_exceeded", body


async def test_caller_down_is_unavailable(external: ExternalServer) -> None:
    nothing_there = f"http://127.0.0.1:{free_port()}"
    env = {"CALLER_BASE_URL": nothing_there, "EXTERNAL_API_URL": external.url()}
    async with ServiceProcess("greeter", env) as greeter, GreeterServiceClient(greeter.url) as c:
        with pytest.raises(ConnectError) as caught:
            await c.greet(GreetRequest(name="alone"))
    assert caught.value.code == Code.UNAVAILABLE


async def test_unreachable_external_target_is_unavailable(stack: Stack) -> None:
    async with CallerServiceClient(stack.caller.url) as client:
        with pytest.raises(ConnectError) as caught:
            await client.call_external(CallExternalRequest(url=f"http://127.0.0.1:{free_port()}/"))
    assert caught.value.code == Code.UNAVAILABLE


async def test_host_outside_the_allowlist_is_permission_denied(external: ExternalServer) -> None:
    env = {"CALLER_ALLOWED_HOSTS": "127.0.0.1"}
    async with ServiceProcess("caller", env) as caller, CallerServiceClient(caller.url) as c:
        allowed = await c.call_external(CallExternalRequest(url=external.url(size=5)))
        assert allowed.body_length == 5
        with pytest.raises(ConnectError) as caught:
            await c.call_external(CallExternalRequest(url="http://localhost:1/"))
    assert caught.value.code == Code.PERMISSION_DENIED


async def test_serve_help_names_the_services() -> None:
    result = await run(sys.executable, "-m", "microapp", "serve", "--help")
    assert result.returncode == 0
    assert "greeter" in result.stdout and "caller" in result.stdout
