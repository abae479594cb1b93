"""Property-based tests: random bytes, random JSON and random protobuf fields sent to every
Connect and REST endpoint of every service, over HTTP/1.1 and h2c.

Whatever arrives, a service answers with an error of the protocol in use: never a 500,
never a traceback in a response, never a crash; and it serves normally afterwards.
Real service processes with real PostgreSQL databases; example counts are kept modest.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyqwest import Client, HTTPTransport, HTTPVersion

from tests.support.postgres import TestPostgres
from tests.support.services import ServiceProcess

EXAMPLES = 20
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # no .hypothesis/ directory in the work tree
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@dataclass(frozen=True)
class Method:
    """One Connect unary method: where it lives and the JSON names of its fields."""

    service: str
    path: str
    fields: tuple[str, ...]
    valid: dict[str, str]  # a well-formed request, for "serves afterwards"


METHODS = [
    Method("greeter", "/greeter.v1.GreeterService/Greet", ("name",), {"name": "fuzz"}),
    Method(
        "caller",
        "/caller.v1.CallerService/CallExternal",
        ("url",),
        {"url": "http://127.0.0.1:1/"},
    ),
    Method("gateway", "/gateway.v1.GatewayService/InvokeCustom", ("name",), {"name": "fuzz"}),
    Method("custom-lang", "/customlang.v1.CustomLangService/Invoke", ("name",), {"name": "fuzz"}),
    Method(
        "auth",
        "/auth.v1.AuthService/Register",
        ("email", "password"),
        {"email": "not-an-address", "password": "x"},
    ),
    Method(
        "auth",
        "/auth.v1.AuthService/Login",
        ("email", "password"),
        {"email": "nobody@example.com", "password": "wrong-password"},
    ),
    Method("auth", "/auth.v1.AuthService/Verify", ("token",), {"token": "not-a-token"}),
]


@dataclass(frozen=True)
class RestPost:
    service: str
    path: str
    fields: tuple[str, ...]


REST_POSTS = [
    RestPost("custom-lang", "/invoke", ("name",)),
    RestPost("auth", "/auth/register", ("email", "password")),
    RestPost("auth", "/auth/login", ("email", "password")),
]

REST_GETS = [
    ("greeter", "/healthz"),
    ("greeter", "/livez"),
    ("gateway", "/debug/breaker"),
    ("auth", "/verify"),
    ("auth", "/.well-known/jwks.json"),
    ("web", "/"),
    ("web", "/config.json"),
    ("web", "/assets/console.js"),
]

POSTS = [(m.service, m.path, m.fields) for m in METHODS] + [
    (r.service, r.path, r.fields) for r in REST_POSTS
]


# ---------------------------------------------------------------------------- services


@dataclass
class Fleet:
    services: dict[str, ServiceProcess]
    h2: Client

    def __getitem__(self, name: str) -> ServiceProcess:
        return self.services[name]


@pytest.fixture(scope="module")
async def fleet(
    postgres: TestPostgres, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Fleet]:
    """Every service, each with its own database where it has one."""
    key_dir: Path = tmp_path_factory.mktemp("auth-keys")
    caller = ServiceProcess(
        "caller",
        {
            "DATABASE_URL": postgres.fresh_database("fuzz_caller"),
            # Random URLs must not send the caller anywhere but this machine.
            "CALLER_ALLOWED_HOSTS": "127.0.0.1",
        },
    )
    lang = ServiceProcess("custom-lang", {"DATABASE_URL": postgres.fresh_database("fuzz_lang")})
    auth = ServiceProcess(
        "auth",
        {"DATABASE_URL": postgres.fresh_database("fuzz_auth"), "AUTH_DEV_KEY_DIR": str(key_dir)},
    )
    web = ServiceProcess("web")
    async with caller, lang, auth, web:
        greeter = ServiceProcess(
            "greeter",
            {
                "DATABASE_URL": postgres.fresh_database("fuzz_greeter"),
                "CALLER_BASE_URL": caller.url,
                "EXTERNAL_API_URL": caller.url + "/livez",
            },
        )
        gateway = ServiceProcess(
            "gateway",
            {
                "DATABASE_URL": postgres.fresh_database("fuzz_gateway"),
                "CUSTOM_LANG_BASE_URL": lang.url,
            },
        )
        async with greeter, gateway:
            services = {s.name: s for s in (greeter, caller, gateway, lang, auth, web)}
            for service in services.values():
                if service.name != "web":
                    await service.wait_for("/healthz", 200)
            transport = HTTPTransport(http_version=HTTPVersion.HTTP2)
            try:
                yield Fleet(services, Client(transport))
            finally:
                await transport.aclose()


# ---------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes


async def send(
    fleet: Fleet,
    service: str,
    method: str,
    path: str,
    *,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    http2: bool = True,
) -> Answer:
    url = fleet[service].url + path
    headers = headers or {}
    if http2:
        response = await fleet.h2.execute(method, url, headers=headers, content=body or None)
        return Answer(response.status, response.content)
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, data=body, headers=headers) as resp,
    ):
        return Answer(resp.status, await resp.read())


def assert_handled(fleet: Fleet, service: str, answer: Answer) -> None:
    """An answer of the protocol in use: no 500, no traceback, the process alive."""
    assert answer.status != 500, f"{service} answered 500: {answer.body[:500]!r}"
    assert b"Traceback" not in answer.body, answer.body[:2000]
    process = fleet[service].process
    assert process is not None and process.returncode is None, fleet[service].logs()[-3000:]


async def assert_serves_afterwards(fleet: Fleet, service: str) -> None:
    """/livez answers, every Connect method of the service answers a well-formed call,
    and nothing reached the unhandled-error handler along the way."""
    answer = await send(fleet, service, "GET", "/livez")
    assert answer.status == 200
    for method in (m for m in METHODS if m.service == service):
        answer = await send(
            fleet,
            service,
            "POST",
            method.path,
            body=json.dumps(method.valid).encode(),
            headers={"content-type": "application/json"},
        )
        assert answer.status < 500 or answer.status == 503, answer
        assert_handled(fleet, service, answer)
    assert "unhandled error" not in fleet[service].logs()


# ---------------------------------------------------------------------------- strategies

CONTENT_TYPES = [
    "application/proto",
    "application/json",
    "application/json; charset=utf-8",
    "application/connect+proto",
    "application/connect+json",
    "application/grpc",
    "application/grpc+proto",
    "application/grpc+json",
    "application/grpc-web",
    "application/grpc-web+proto",
    "application/grpc-web-text",
    "text/plain",
    "multipart/form-data; boundary=x",
]
header_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40
).map(str.strip)
content_types = st.sampled_from(CONTENT_TYPES) | header_text
# Protocol headers a client controls, with values that may be garbage.
extra_headers = st.dictionaries(
    st.sampled_from(
        [
            "connect-protocol-version",
            "connect-timeout-ms",
            "grpc-timeout",
            "content-encoding",
            "connect-content-encoding",
            "grpc-encoding",
            "authorization",
            "te",
        ]
    ),
    st.sampled_from(["1", "0", "gzip", "br", "identity", "-5", "99999999999999", "1S", "trailers"])
    | header_text,
    max_size=3,
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def json_documents(fields: tuple[str, ...]) -> st.SearchStrategy[bytes]:
    """Any JSON value, or an object using the message's own field names with values of
    any type, serialized (NaN and Infinity included, as a sloppy client would send)."""
    shaped = st.dictionaries(st.sampled_from(fields) | st.text(max_size=8), json_values, max_size=4)
    return (json_values | shaped).map(lambda v: json.dumps(v).encode())


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


@st.composite
def protobuf_messages(draw: st.DrawFn) -> bytes:
    """A sequence of wire-format fields with random numbers, wire types and payloads:
    known fields with the wrong type, unknown fields, invalid UTF-8, bad wire types,
    and sometimes a truncated tail."""
    out = bytearray()
    for _ in range(draw(st.integers(0, 6))):
        number = draw(st.integers(1, 5) | st.integers(1, 2**29 - 1))
        wire = draw(st.sampled_from([0, 1, 2, 5, 2, 2, 3, 4, 6, 7]))
        out += _varint(number << 3 | wire)
        if wire == 0:
            out += _varint(draw(st.integers(0, 2**64 - 1)))
        elif wire == 1:
            out += draw(st.binary(min_size=8, max_size=8))
        elif wire == 5:
            out += draw(st.binary(min_size=4, max_size=4))
        elif wire == 2:
            payload = draw(
                st.binary(max_size=64)
                | st.text(max_size=64).map(str.encode)
                | st.just(b"\xff\xfe\xfd")
            )
            declared = draw(st.just(len(payload)) | st.integers(0, 2**32))
            out += _varint(declared) + payload
    if draw(st.booleans()) and out:
        out = out[: draw(st.integers(0, len(out)))]
    return bytes(out)


def envelope(message: bytes, *, flags: int = 0) -> bytes:
    """A gRPC / gRPC-Web / Connect streaming length-prefixed message."""
    return bytes([flags]) + len(message).to_bytes(4, "big") + message


# ---------------------------------------------------------------------------- tests


@pytest.mark.parametrize(("service", "path", "fields"), POSTS, ids=[p[1] for p in POSTS])
@FUZZ_SETTINGS
@given(
    body=st.binary(max_size=2048),
    content_type=content_types,
    headers=extra_headers,
    http2=st.booleans(),
)
async def test_random_bytes_never_break_an_endpoint(
    fleet: Fleet,
    service: str,
    path: str,
    fields: tuple[str, ...],
    body: bytes,
    content_type: str,
    headers: dict[str, str],
    http2: bool,
) -> None:
    answer = await send(
        fleet,
        service,
        "POST",
        path,
        body=body,
        headers={**headers, "content-type": content_type},
        http2=http2,
    )
    assert_handled(fleet, service, answer)


@pytest.mark.parametrize(("service", "path", "fields"), POSTS, ids=[p[1] for p in POSTS])
@FUZZ_SETTINGS
@given(data=st.data(), http2=st.booleans())
async def test_random_json_never_breaks_an_endpoint(
    fleet: Fleet,
    service: str,
    path: str,
    fields: tuple[str, ...],
    data: st.DataObject,
    http2: bool,
) -> None:
    body = data.draw(json_documents(fields))
    answer = await send(
        fleet,
        service,
        "POST",
        path,
        body=body,
        headers={"content-type": "application/json"},
        http2=http2,
    )
    assert_handled(fleet, service, answer)


PROTO_FRAMINGS = {
    # content type → how the message travels, and which HTTP versions carry it
    "application/proto": (lambda m: m, (True, False)),
    "application/grpc": (envelope, (True,)),
    "application/grpc-web+proto": (envelope, (True, False)),
    "application/connect+proto": (envelope, (True, False)),
}


@pytest.mark.parametrize("method", METHODS, ids=[m.path for m in METHODS])
@FUZZ_SETTINGS
@given(
    message=protobuf_messages(),
    content_type=st.sampled_from(sorted(PROTO_FRAMINGS)),
    data=st.data(),
)
async def test_random_protobuf_fields_never_break_a_connect_method(
    fleet: Fleet, method: Method, message: bytes, content_type: str, data: st.DataObject
) -> None:
    frame, versions = PROTO_FRAMINGS[content_type]
    http2 = data.draw(st.sampled_from(versions))
    headers = {"content-type": content_type}
    if content_type.startswith("application/grpc"):
        headers["te"] = "trailers"
    answer = await send(
        fleet,
        method.service,
        "POST",
        method.path,
        body=frame(message),
        headers=headers,
        http2=http2,
    )
    assert_handled(fleet, method.service, answer)


@pytest.mark.parametrize("method", METHODS, ids=[m.path for m in METHODS])
async def test_connect_method_serves_after_random_protobuf(fleet: Fleet, method: Method) -> None:
    await assert_serves_afterwards(fleet, method.service)


@FUZZ_SETTINGS
@given(
    message=protobuf_messages() | st.binary(max_size=64),
    encoding=st.sampled_from(["proto", "json", "xml"]) | header_text,
    as_base64=st.booleans(),
    extra=st.dictionaries(
        st.sampled_from(["compression", "connect", "base64", "x"]), header_text, max_size=2
    ),
)
async def test_random_connect_get_query_never_breaks_greet(
    fleet: Fleet, message: bytes, encoding: str, as_base64: bool, extra: dict[str, str]
) -> None:
    # Greet is NO_SIDE_EFFECTS, so it also answers Connect GET with the message in the URL.
    value = base64.urlsafe_b64encode(message).decode() if as_base64 else message.decode("latin-1")
    query = {"encoding": encoding, "message": value, **extra}
    if as_base64:
        query["base64"] = "1"
    async with (
        aiohttp.ClientSession() as session,
        session.get(fleet["greeter"].url + METHODS[0].path, params=query) as resp,
    ):
        answer = Answer(resp.status, await resp.read())
    assert_handled(fleet, "greeter", answer)


@pytest.mark.parametrize(("service", "path"), REST_GETS, ids=[p for _, p in REST_GETS])
@FUZZ_SETTINGS
@given(
    suffix=st.sampled_from(["", "/", "//", "/..", "/%00", "/x"])
    | header_text.map(lambda t: "/" + t),
    query=st.dictionaries(header_text, header_text, max_size=3),
    authorization=st.none() | header_text | header_text.map(lambda t: "Bearer " + t),
    method=st.sampled_from(["GET", "HEAD", "POST", "OPTIONS", "DELETE"]),
)
async def test_random_paths_queries_and_headers_never_break_a_rest_endpoint(
    fleet: Fleet,
    service: str,
    path: str,
    suffix: str,
    query: dict[str, str],
    authorization: str | None,
    method: str,
) -> None:
    headers = {"authorization": authorization} if authorization is not None else {}
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method, fleet[service].url + path + suffix, params=query, headers=headers
        ) as resp,
    ):
        answer = Answer(resp.status, await resp.read())
    assert_handled(fleet, service, answer)


@pytest.mark.parametrize("service", ["greeter", "caller", "gateway", "custom-lang", "auth", "web"])
async def test_service_serves_after_everything(fleet: Fleet, service: str) -> None:
    await assert_serves_afterwards(fleet, service)
    if service == "web":
        answer = await send(fleet, "web", "GET", "/config.json")
        assert answer.status == 200
        json.loads(answer.body)
