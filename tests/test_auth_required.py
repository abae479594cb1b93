"""`AUTH_REQUIRED=1`: services check bearer tokens against the auth service's JWKS."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt as pyjwt
import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from microapp.gen.greeter.v1.greeter_connect import GreeterServiceClient
from microapp.gen.greeter.v1.greeter_pb2 import GreetRequest
from microapp.platform.authn import InvalidToken, JwksClient, KeysUnavailable, current_principal
from microapp.platform.config import CommonSettings
from microapp.platform.http import ServiceParts, build_app
from tests.support.clock import FakeClock
from tests.support.commands import BIN, run
from tests.support.external import ExternalServer
from tests.support.inprocess import serving
from tests.support.jwt import TestKey, token_from_auth
from tests.support.ports import free_port
from tests.support.services import ServiceProcess

GREET = "/greeter.v1.GreeterService/Greet"


# --- a greeter behind AUTH_REQUIRED=1, with tokens from a real auth process ------------------


@dataclass
class Stack:
    auth: ServiceProcess
    greeter: ServiceProcess


@pytest.fixture(scope="module")
async def stack(
    external: ExternalServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    auth_env = {"AUTH_DEV_KEY_DIR": str(tmp_path_factory.mktemp("auth-keys")), "AUTH_DEV_MODE": "1"}
    async with ServiceProcess("auth", auth_env) as auth, ServiceProcess("caller") as caller:
        greeter_env = {
            "AUTH_REQUIRED": "1",
            "AUTH_JWKS_URL": auth.url + "/.well-known/jwks.json",
            "CALLER_BASE_URL": caller.url,
            "EXTERNAL_API_URL": external.url(size=7),
        }
        async with ServiceProcess("greeter", greeter_env) as greeter:
            yield Stack(auth, greeter)


async def test_greeter_refuses_a_call_without_a_token_as_unauthenticated(stack: Stack) -> None:
    async with GreeterServiceClient(stack.greeter.url) as client:
        with pytest.raises(ConnectError) as caught:
            await client.greet(GreetRequest(name="anonymous"))
    assert caught.value.code == Code.UNAUTHENTICATED


async def test_greeter_serves_a_call_with_a_token_from_auth(stack: Stack) -> None:
    token = await token_from_auth(stack.auth.url)
    async with GreeterServiceClient(stack.greeter.url) as client:
        response = await client.greet(
            GreetRequest(name="Ada"), headers={"Authorization": f"Bearer {token}"}
        )
    assert response.message == "Hello Ada from greeter-service!"
    assert response.external_body_length == 7


async def test_greeter_refuses_a_garbage_token_as_unauthenticated(stack: Stack) -> None:
    async with GreeterServiceClient(stack.greeter.url) as client:
        with pytest.raises(ConnectError) as caught:
            await client.greet(GreetRequest(), headers={"Authorization": "Bearer abc.def.ghi"})
    assert caught.value.code == Code.UNAUTHENTICATED


async def test_greeter_refuses_a_token_forged_with_another_key(stack: Stack) -> None:
    genuine = await token_from_auth(stack.auth.url)
    forger = TestKey.new()
    forged = forger.sign(kid=pyjwt.get_unverified_header(genuine)["kid"])
    async with GreeterServiceClient(stack.greeter.url) as client:
        with pytest.raises(ConnectError) as caught:
            await client.greet(GreetRequest(), headers={"Authorization": f"Bearer {forged}"})
    assert caught.value.code == Code.UNAUTHENTICATED


@pytest.mark.parametrize("protocol", ["grpc", "grpcweb"])
async def test_grpc_call_without_a_token_is_unauthenticated(stack: Stack, protocol: str) -> None:
    result = await run(
        str(BIN / "buf"), "curl", "--protocol", protocol, "--http2-prior-knowledge",
        "-d", '{"name": "grpc"}', stack.greeter.url + GREET,
    )  # fmt: skip
    assert result.returncode != 0
    assert "unauthenticated" in result.stderr


async def test_grpc_call_with_a_token_is_served(stack: Stack) -> None:
    token = await token_from_auth(stack.auth.url)
    result = await run(
        str(BIN / "buf"), "curl", "--protocol", "grpc", "--http2-prior-knowledge",
        "-H", f"Authorization: Bearer {token}",
        "-d", '{"name": "grpc"}', stack.greeter.url + GREET,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["message"] == "Hello grpc from greeter-service!"


@pytest.mark.parametrize("path", ["/healthz", "/livez"])
async def test_health_routes_stay_open_without_a_token(stack: Stack, path: str) -> None:
    async with aiohttp.ClientSession() as session, session.get(stack.greeter.url + path) as resp:
        assert resp.status == 200


async def test_auth_required_without_a_jwks_url_stops_the_service_with_a_clear_message() -> None:
    service = ServiceProcess("greeter", {"AUTH_REQUIRED": "1"})
    with pytest.raises(RuntimeError, match="exited early"):
        await service.start(timeout=30)
    assert service.process is not None
    assert await service.process.wait() == 2
    assert "AUTH_JWKS_URL" in service.logs()


# --- the JWKS client and the REST guard, against a JWKS server the test controls --------------


@dataclass
class JwksServer:
    """A real HTTP server publishing whatever keys the test puts in `keys`."""

    keys: list[TestKey]
    server: ExternalServer

    @property
    def url(self) -> str:
        return self.server.url_for("/jwks.json")

    @property
    def requests(self) -> int:
        return self.server.requests


@pytest.fixture
async def jwks_server() -> AsyncIterator[JwksServer]:
    async with ExternalServer() as server:
        jwks = JwksServer([TestKey.new()], server)
        server.serve_json("/jwks.json", lambda: {"keys": [key.jwk() for key in jwks.keys]})
        yield jwks


@pytest.fixture
async def jwks_client(jwks_server: JwksServer) -> AsyncIterator[tuple[JwksClient, FakeClock]]:
    clock = FakeClock()
    async with JwksClient(jwks_server.url, min_refresh_interval=10.0, clock=clock) as client:
        yield client, clock


async def test_keys_are_fetched_once_for_many_tokens(
    jwks_server: JwksServer, jwks_client: tuple[JwksClient, FakeClock]
) -> None:
    client, _ = jwks_client
    [key] = jwks_server.keys
    principals = await asyncio.gather(*(client.verify(key.sign(sub=f"u{i}")) for i in range(5)))
    assert [p.user_id for p in principals] == [f"u{i}" for i in range(5)]
    assert jwks_server.requests == 1


async def test_keys_are_fetched_again_when_a_token_names_a_new_kid(
    jwks_server: JwksServer, jwks_client: tuple[JwksClient, FakeClock]
) -> None:
    client, clock = jwks_client
    await client.verify(jwks_server.keys[0].sign())
    rotated = TestKey.new()
    jwks_server.keys = [rotated]
    clock.now += 11
    principal = await client.verify(rotated.sign(sub="after-rotation"))
    assert principal.user_id == "after-rotation"
    assert jwks_server.requests == 2


async def test_unknown_kids_refetch_at_most_once_per_interval(
    jwks_server: JwksServer, jwks_client: tuple[JwksClient, FakeClock]
) -> None:
    client, clock = jwks_client
    await client.verify(jwks_server.keys[0].sign())
    for _ in range(3):
        with pytest.raises(InvalidToken):
            await client.verify(jwks_server.keys[0].sign(kid="made-up"))
    assert jwks_server.requests == 1
    clock.now += 11
    with pytest.raises(InvalidToken):
        await client.verify(jwks_server.keys[0].sign(kid="made-up"))
    assert jwks_server.requests == 2


async def test_garbage_tokens_cause_no_fetch(
    jwks_server: JwksServer, jwks_client: tuple[JwksClient, FakeClock]
) -> None:
    client, _ = jwks_client
    for token in ("garbage", "a.b.c", ""):
        with pytest.raises(InvalidToken):
            await client.verify(token)
    assert jwks_server.requests == 0


async def test_unreachable_jwks_means_keys_unavailable_not_an_invalid_token() -> None:
    async with JwksClient(f"http://127.0.0.1:{free_port()}/jwks.json") as client:
        with pytest.raises(KeysUnavailable):
            await client.verify(TestKey.new().sign())


@pytest.fixture
async def rest_service(jwks_server: JwksServer) -> AsyncIterator[str]:
    async def whoami(request: Request) -> JSONResponse:
        principal = current_principal()
        assert principal is not None
        return JSONResponse({"userId": principal.user_id})

    settings = CommonSettings(service="rest", auth_required=True, auth_jwks_url=jwks_server.url)
    app = build_app(
        settings, ServiceParts(connect=[], proto_files=[], routes=[Route("/whoami", whoami)])
    )
    async with serving(app) as url:
        yield url


async def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any, str | None]:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None), resp.headers.get("WWW-Authenticate")


async def test_rest_route_without_a_token_is_401_json(rest_service: str) -> None:
    status, body, challenge = await _get(rest_service + "/whoami")
    assert status == 401
    assert "error" in body
    assert challenge == "Bearer"


async def test_rest_route_with_an_expired_token_is_401(
    rest_service: str, jwks_server: JwksServer
) -> None:
    expired = jwks_server.keys[0].sign(exp=int(time.time()) - 10)
    status, _, _ = await _get(rest_service + "/whoami", {"Authorization": f"Bearer {expired}"})
    assert status == 401


async def test_rest_route_with_a_valid_token_sees_the_caller(
    rest_service: str, jwks_server: JwksServer
) -> None:
    token = jwks_server.keys[0].sign(sub="user-42")
    status, body, _ = await _get(rest_service + "/whoami", {"Authorization": f"Bearer {token}"})
    assert status == 200
    assert body == {"userId": "user-42"}


async def test_rest_service_health_stays_open(rest_service: str) -> None:
    async with aiohttp.ClientSession() as session, session.get(rest_service + "/healthz") as resp:
        assert resp.status == 200
