"""Bad input gets a clear error of the protocol in use, and the server keeps serving."""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import unquote

import aiohttp
import pytest

from microapp.gen.greeter.v1.greeter_connect import GreeterServiceClient
from microapp.gen.greeter.v1.greeter_pb2 import GreetRequest
from tests.support.external import ExternalServer
from tests.support.services import ServiceProcess

GREET = "/greeter.v1.GreeterService/Greet"
TWO_MIB = 2 * 1024 * 1024


@pytest.fixture(scope="module")
async def greeter(external: ExternalServer) -> AsyncIterator[ServiceProcess]:
    async with ServiceProcess("caller") as caller:
        env = {"CALLER_BASE_URL": caller.url, "EXTERNAL_API_URL": external.url(size=10)}
        async with ServiceProcess("greeter", env) as greeter:
            yield greeter


async def _post(url: str, body: bytes, content_type: str) -> tuple[int, dict[str, object]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=body, headers={"content-type": content_type}) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


async def _still_serving(greeter: ServiceProcess) -> None:
    assert greeter.process is not None and greeter.process.returncode is None
    async with GreeterServiceClient(greeter.url) as client:
        response = await client.greet(GreetRequest(name="after"))
    assert response.message == "Hello after from greeter-service!"


async def test_malformed_json_is_invalid_argument(greeter: ServiceProcess) -> None:
    status, body = await _post(greeter.url + GREET, b'{"name": ', "application/json")
    assert status == 400
    assert body["code"] == "invalid_argument"
    await _still_serving(greeter)


async def test_json_of_the_wrong_shape_is_invalid_argument(greeter: ServiceProcess) -> None:
    status, body = await _post(greeter.url + GREET, b'{"name": 42}', "application/json")
    assert status == 400
    assert body["code"] == "invalid_argument"
    await _still_serving(greeter)


async def test_binary_garbage_is_invalid_argument(greeter: ServiceProcess) -> None:
    garbage = bytes(range(256)) * 4
    status, body = await _post(greeter.url + GREET, garbage, "application/proto")
    assert status == 400
    assert body["code"] == "invalid_argument"
    await _still_serving(greeter)


async def test_two_mib_body_is_resource_exhausted(greeter: ServiceProcess) -> None:
    big = b'{"name": "' + b"a" * TWO_MIB + b'"}'
    status, body = await _post(greeter.url + GREET, big, "application/json")
    assert body["code"] == "resource_exhausted"
    assert status == 429  # Connect's HTTP status for resource_exhausted
    await _still_serving(greeter)


async def test_unknown_content_type_is_refused(greeter: ServiceProcess) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            greeter.url + GREET, data=b"name=x", headers={"content-type": "text/plain"}
        ) as resp,
    ):
        assert resp.status == 415
    await _still_serving(greeter)


async def test_grpc_garbage_frame_gets_a_grpc_status(greeter: ServiceProcess) -> None:
    # A gRPC-Web frame header announcing 5 bytes, followed by bytes that are no protobuf.
    frame = b"\x00\x00\x00\x00\x05\xff\xff\xff\xff\xff"
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            greeter.url + GREET, data=frame, headers={"content-type": "application/grpc-web+proto"}
        ) as resp,
    ):
        assert resp.status == 200  # gRPC-Web carries the error in its trailers, not in HTTP
        body = await resp.read()
    assert body[0] == 0x80  # a trailers frame
    trailers = dict(line.split(": ", 1) for line in body[5:].decode().split("\r\n") if line)
    assert trailers["grpc-status"] == "3"  # INVALID_ARGUMENT
    await _still_serving(greeter)


@pytest.mark.parametrize("path", ["/nope", "/greeter.v1.GreeterService/Nope", "/x.v1.Y/Z"])
async def test_unknown_path_is_404(greeter: ServiceProcess, path: str) -> None:
    async with aiohttp.ClientSession() as session, session.post(greeter.url + path) as resp:
        assert resp.status == 404
    await _still_serving(greeter)


async def test_rest_errors_are_json(greeter: ServiceProcess) -> None:
    async with aiohttp.ClientSession() as session, session.get(greeter.url + "/nope") as resp:
        assert resp.status == 404
        assert await resp.json() == {"error": "Not Found"}


async def test_nul_in_a_connect_get_query_is_invalid_argument(greeter: ServiceProcess) -> None:
    # Connect GET carries the message in the query string; it is checked like a POST body.
    query = {"encoding": "json", "message": '{"name": "a\\u0000b"}'}
    async with (
        aiohttp.ClientSession() as session,
        session.get(greeter.url + GREET, params=query) as resp,
    ):
        assert resp.status == 400
        body = await resp.json(content_type=None)
    assert body == {"code": "invalid_argument", "message": "name must not contain NUL characters"}
    await _still_serving(greeter)


async def test_nul_in_a_grpc_web_message_is_invalid_argument(greeter: ServiceProcess) -> None:
    message = GreetRequest(name="a\x00b").SerializeToString()
    frame = b"\x00" + len(message).to_bytes(4, "big") + message
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            greeter.url + GREET, data=frame, headers={"content-type": "application/grpc-web+proto"}
        ) as resp,
    ):
        body = await resp.read()
    trailers = dict(line.split(": ", 1) for line in body[5:].decode().split("\r\n") if line)
    assert trailers["grpc-status"] == "3"  # INVALID_ARGUMENT
    assert unquote(trailers["grpc-message"]) == "name must not contain NUL characters"
    await _still_serving(greeter)
