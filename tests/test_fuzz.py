"""Property-based tests: random bytes, random JSON, random protobuf fields and random protocol
headers sent to every Connect method of every service in the registry, and to the REST
endpoints, over HTTP/1.1 and h2c.

Each kind of malformed input gets its own error, in the protocol in use (docs/api.md,
docs/security.md), and never a 500, a traceback or a dead process:

- Connect unary: a content type other than `application/proto` or `application/json` is
  HTTP 415; a body its codec cannot decode is `invalid_argument` (400); a protocol header it
  refuses is `invalid_argument`, or `unimplemented` (501) for an unknown compression; a message
  that decodes gets the answer, or an error of the service's own (never `internal`/`unknown`).
  Every Connect error is `{"code", "message"}` with the HTTP status of its code.
- gRPC: over h2c, a frame that does not decode is grpc-status 3 (`invalid_argument`); over
  HTTP/1.1, gRPC is 12 (`unimplemented`). gRPC-Web carries the same statuses in its body.
- REST POSTs: anything but `application/json` in UTF-8 is 415; a body that is not a UTF-8
  JSON object is 400; errors are `{"error": "..."}`.

Whether a body decodes is decided here with the same protobuf runtime the services use.
Valid requests succeed before and after the fuzzing. Real service processes with real
PostgreSQL databases; example counts are kept modest.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyqwest import Client, HTTPTransport, HTTPVersion

from microapp.services import SERVICES, Call
from tests.support.external import ExternalServer
from tests.support.postgres import TestPostgres
from tests.support.services import ServiceProcess

EXAMPLES = 20
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # no .hypothesis/ directory in the work tree
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
PASSWORD = "correct horse battery"

# The Connect protocol's HTTP status for each code.
CONNECT_STATUS = {
    "canceled": 499,
    "unknown": 500,
    "invalid_argument": 400,
    "deadline_exceeded": 504,
    "not_found": 404,
    "already_exists": 409,
    "permission_denied": 403,
    "resource_exhausted": 429,
    "failed_precondition": 400,
    "aborted": 409,
    "out_of_range": 400,
    "unimplemented": 501,
    "internal": 500,
    "unavailable": 503,
    "data_loss": 500,
    "unauthenticated": 401,
}
GRPC_CODES = list(CONNECT_STATUS)  # gRPC numbers them 1..16 in this order
# What a service may answer a well-formed message it does not like; never internal/unknown.
SERVICE_CODES = frozenset(
    {
        "invalid_argument",
        "not_found",
        "already_exists",
        "permission_denied",
        "resource_exhausted",
        "failed_precondition",
        "aborted",
        "out_of_range",
        "unauthenticated",
        "unavailable",  # caller: a random loopback URL that nothing answers
        "deadline_exceeded",
    }
)


# ---------------------------------------------------------------------------- the registry


SERVICE_NAMES = list(SERVICES)


def service_calls(name: str) -> list[Call]:
    """The calls a service makes itself (not its page's, not the ones only Traefik needs)."""
    return [call for call in SERVICES[name].calls if not call.browser and not call.proxied]


def start_order() -> list[str]:
    """Every registered service, each after the services it calls."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name not in order:
            for call in service_calls(name):
                visit(call.service)
            order.append(name)

    for name in SERVICES:
        visit(name)
    return order


@dataclass(frozen=True)
class Method:
    """One Connect unary method of a registered service."""

    service: str
    path: str
    input: type[Message]
    output: type[Message]

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(f.json_name for f in self.input.DESCRIPTOR.fields)


def registry_methods() -> list[Method]:
    """Every unary method of every Connect service the registry's services answer."""
    pool = descriptor_pool.Default()
    methods = []
    for spec in SERVICES.values():
        for connect_path in spec.connect_paths:
            service = pool.FindServiceByName(connect_path.strip("/"))
            for method in service.methods:
                if method.client_streaming or method.server_streaming:
                    continue  # streams are fuzzed by their own tests (test_greeter_v2)
                methods.append(
                    Method(
                        spec.name,
                        f"{connect_path}/{method.name}",
                        message_factory.GetMessageClass(method.input_type),
                        message_factory.GetMessageClass(method.output_type),
                    )
                )
    return methods


METHODS = registry_methods()
METHOD_IDS = [m.path for m in METHODS]


@dataclass(frozen=True)
class RestPost:
    service: str
    path: str
    fields: tuple[str, ...]
    success: int


REST_POSTS = [
    RestPost("custom-lang", "/invoke", ("name",), 200),
    RestPost("auth", "/auth/register", ("email", "password"), 201),
    RestPost("auth", "/auth/login", ("email", "password"), 200),
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
REST_GET_IDS = [f"{service}{path}" for service, path in REST_GETS]


# ---------------------------------------------------------------------------- services


@dataclass
class Fleet:
    services: dict[str, ServiceProcess]
    h2: Client
    external: ExternalServer
    email: str = field(default_factory=lambda: _unique_email())
    token: str = ""

    def __getitem__(self, name: str) -> ServiceProcess:
        return self.services[name]


def _unique_email() -> str:
    return f"fuzz-{uuid.uuid4().hex[:12]}@example.org"


# A well-formed request of each method, and what it needs from the fleet. A method added
# to a registered service fails `test_every_method_has_a_valid_request` until it has one.
VALID: dict[str, Callable[[Fleet], dict[str, str]]] = {
    "/greeter.v1.GreeterService/Greet": lambda _: {"name": "fuzz"},
    "/greeter.v2.GreeterService/Greet": lambda _: {"name": "fuzz", "locale": "fr"},
    "/caller.v1.CallerService/CallExternal": lambda f: {"url": f.external.url(size=3)},
    "/gateway.v1.GatewayService/InvokeCustom": lambda _: {"name": "fuzz"},
    "/customlang.v1.CustomLangService/Invoke": lambda _: {"name": "fuzz"},
    "/auth.v1.AuthService/Register": lambda _: {"email": _unique_email(), "password": PASSWORD},
    "/auth.v1.AuthService/Login": lambda f: {"email": f.email, "password": PASSWORD},
    "/auth.v1.AuthService/Verify": lambda f: {"token": f.token},
}
VALID_REST: dict[str, Callable[[Fleet], dict[str, str]]] = {
    "/invoke": lambda _: {"name": "fuzz"},
    "/auth/register": lambda _: {"email": _unique_email(), "password": PASSWORD},
    "/auth/login": lambda f: {"email": f.email, "password": PASSWORD},
}


@pytest.fixture(scope="module")
async def fleet(
    postgres: TestPostgres, external: ExternalServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Fleet]:
    """Every service of the registry, each with a database of its own where it has one,
    wired to the services it calls as the registry says."""
    key_dir: Path = tmp_path_factory.mktemp("auth-keys")
    extra = {
        # Random URLs must not send the caller anywhere but this machine.
        "caller": {"CALLER_ALLOWED_HOSTS": "127.0.0.1"},
        "greeter": {"EXTERNAL_API_URL": external.url(size=3)},
        "auth": {"AUTH_DEV_KEY_DIR": str(key_dir)},
    }

    def make(name: str, started: Mapping[str, ServiceProcess]) -> ServiceProcess:
        env = {c.variable: started[c.service].url + c.path for c in service_calls(name)}
        if SERVICES[name].database:
            env["DATABASE_URL"] = postgres.fresh_database(f"fuzz_{name.replace('-', '_')}")
        return ServiceProcess(name, {**env, **extra.get(name, {})})

    services: dict[str, ServiceProcess] = {}
    transport = HTTPTransport(http_version=HTTPVersion.HTTP2)
    try:
        for name in start_order():
            services[name] = make(name, services)
            await services[name].start()
        for service in services.values():
            await service.wait_for("/healthz", 200)
        fleet = Fleet(services, Client(transport), external)
        await _sign_up(fleet)
        yield fleet
    finally:
        await transport.aclose()
        for service in reversed(services.values()):
            await service.stop()


async def _sign_up(fleet: Fleet) -> None:
    """The user Login and Verify's valid requests use."""
    url = fleet["auth"].url
    credentials = {"email": fleet.email, "password": PASSWORD}
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/auth/register", json=credentials) as resp:
            assert resp.status == 201, await resp.text()
        async with session.post(url + "/auth/login", json=credentials) as resp:
            assert resp.status == 200, await resp.text()
            fleet.token = (await resp.json())["token"]


# ---------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    headers: dict[str, str]
    trailers: dict[str, str]


async def send(
    fleet: Fleet,
    service: str,
    method: str,
    url_path: str,
    *,
    body: bytes = b"",
    headers: Mapping[str, str] | None = None,
    http2: bool = True,
) -> Answer:
    url = fleet[service].url + url_path
    headers = dict(headers or {})
    if http2:
        response = await fleet.h2.execute(method, url, headers=headers, content=body or None)
        content = response.content
        return Answer(
            response.status,
            content,
            {k.lower(): v for k, v in response.headers.items()},
            {k.lower(): v for k, v in response.trailers.items()},
        )
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, data=body, headers=headers) as resp,
    ):
        content = await resp.read()
        return Answer(resp.status, content, {k.lower(): v for k, v in resp.headers.items()}, {})


async def post_json(fleet: Fleet, service: str, path: str, document: object) -> Answer:
    body = json.dumps(document).encode()
    return await send(fleet, service, "POST", path, body=body, headers=JSON)


JSON = {"content-type": "application/json"}


# ---------------------------------------------------------------------------- what must come back


def assert_alive(fleet: Fleet, service: str, answer: Answer) -> None:
    """No 500, no traceback, the process alive."""
    assert answer.status != 500, f"{service} answered 500: {answer.body[:500]!r}"
    assert b"Traceback" not in answer.body, answer.body[:2000]
    process = fleet[service].process
    assert process is not None and process.returncode is None, fleet[service].logs()[-3000:]


def connect_code(answer: Answer) -> str:
    """The code of a Connect error, checked to be of the protocol's shape."""
    document = json.loads(answer.body)
    assert isinstance(document, dict) and isinstance(document.get("message", ""), str), document
    code = document["code"]
    assert CONNECT_STATUS.get(code) == answer.status, (code, answer.status)
    return code


def decodes(body: bytes, codec: str, message: type[Message]) -> bool:
    """Whether the services' protobuf runtime decodes `body` as `message` with `codec`."""
    try:
        if codec == "json":
            json_format.Parse(body, message(), ignore_unknown_fields=True)
        else:
            message.FromString(body)
    except (DecodeError, json_format.ParseError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return True


def assert_connect_answer(
    fleet: Fleet, method: Method, answer: Answer, *, codec: str, well_formed: bool
) -> None:
    """What a Connect unary call must get: a request that does not decode is exactly
    `invalid_argument`; one that does gets the response or an error of the service's own."""
    assert_alive(fleet, method.service, answer)
    if not well_formed:
        assert (answer.status, connect_code(answer)) == (400, "invalid_argument"), answer
    elif answer.status == 200:
        assert decodes(answer.body, codec, method.output), answer
    else:
        assert connect_code(answer) in SERVICE_CODES, answer


def assert_rest_error(answer: Answer, *statuses: int) -> None:
    """A REST error of one of `statuses`, as `{"error": "..."}`."""
    assert answer.status in statuses, answer
    document = json.loads(answer.body)
    assert isinstance(document, dict) and isinstance(document["error"], str), document


def grpc_status(answer: Answer) -> str:
    """The gRPC status of a gRPC or gRPC-Web answer, as a Connect code name (or "ok")."""
    assert answer.status == 200, answer
    value = answer.trailers.get("grpc-status") or answer.headers.get("grpc-status")
    if value is None:  # gRPC-Web: the trailers are the body's last frame
        frames = answer.body
        while frames:
            flags, size = frames[0], int.from_bytes(frames[1:5], "big")
            if flags & 0x80:
                trailer = frames[5 : 5 + size].decode()
                value = dict(
                    line.split(":", 1) for line in trailer.split("\r\n") if ":" in line
                ).get("grpc-status")
            frames = frames[5 + size :]
    assert value is not None, answer
    number = int(value.strip())
    return "ok" if number == 0 else GRPC_CODES[number - 1]


def _media_type(content_type: str) -> tuple[str, dict[str, str]]:
    media, _, rest = content_type.partition(";")
    params = {}
    for part in rest.split(";"):
        key, _, value = part.partition("=")
        if key.strip():
            params[key.strip().lower()] = value.strip().lower()
    return media.strip().lower(), params


def connect_unary_codec(content_type: str) -> str | None:
    """The codec a Connect unary call with this content type uses; None: 415."""
    media, _ = _media_type(content_type)
    return {"application/proto": "proto", "application/json": "json"}.get(media)


def rest_accepts(content_type: str) -> bool:
    media, params = _media_type(content_type)
    return media == "application/json" and params.get("charset", "utf-8") == "utf-8"


def json_object(body: bytes) -> bool:
    try:
        return isinstance(json.loads(body.decode("utf-8")), dict)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False


# ---------------------------------------------------------------------------- strategies

CONNECT_CODEC_TYPES = ["application/proto", "application/json", "application/json; charset=utf-8"]
OTHER_TYPES = [
    "application/connect+proto",  # a streaming type, on a unary method
    "application/connect+json",
    "application/grpc-web-text",
    "application/xml",
    "text/plain",
    "multipart/form-data; boundary=x",
    "",
]
header_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40
).map(str.strip)
# Protocol headers a client controls, with values that may be garbage.
protocol_headers = st.dictionaries(
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
    min_size=1,
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


# ---------------------------------------------------------------------------- valid requests


def test_every_method_has_a_valid_request() -> None:
    assert METHODS, "no Connect method found through the registry"
    assert sorted(m.path for m in METHODS) == sorted(VALID)


async def assert_valid_requests_succeed(fleet: Fleet, service: str) -> None:
    """Each method and REST endpoint of `service` serves a well-formed request."""
    for method in (m for m in METHODS if m.service == service):
        for http2 in (True, False):
            body = json.dumps(VALID[method.path](fleet)).encode()
            answer = await send(
                fleet, service, "POST", method.path, body=body, headers=JSON, http2=http2
            )
            assert answer.status == 200, (method.path, answer)
            assert decodes(answer.body, "json", method.output)
    for post in (p for p in REST_POSTS if p.service == service):
        answer = await post_json(fleet, service, post.path, VALID_REST[post.path](fleet))
        assert answer.status == post.success, (post.path, answer)
    for get_service, path in REST_GETS:
        if get_service == service:
            bearer = {"authorization": f"Bearer {fleet.token}"}
            answer = await send(fleet, service, "GET", path, headers=bearer)
            assert answer.status == 200, (path, answer)


@pytest.mark.parametrize("service", SERVICE_NAMES)
async def test_valid_requests_succeed(fleet: Fleet, service: str) -> None:
    await assert_valid_requests_succeed(fleet, service)


# ---------------------------------------------------------------------------- Connect methods


@pytest.mark.parametrize("method", METHODS, ids=METHOD_IDS)
@FUZZ_SETTINGS
@given(
    body=st.binary(max_size=2048),
    content_type=st.sampled_from(CONNECT_CODEC_TYPES),
    http2=st.booleans(),
)
async def test_random_bytes_to_a_connect_method_are_invalid_argument_unless_they_decode(
    fleet: Fleet, method: Method, body: bytes, content_type: str, http2: bool
) -> None:
    codec = connect_unary_codec(content_type)
    assert codec is not None
    answer = await send(
        fleet, method.service, "POST", method.path, body=body,
        headers={"content-type": content_type}, http2=http2,
    )  # fmt: skip
    well_formed = decodes(body, codec, method.input)
    assert_connect_answer(fleet, method, answer, codec=codec, well_formed=well_formed)


@pytest.mark.parametrize("method", METHODS, ids=METHOD_IDS)
@FUZZ_SETTINGS
@given(data=st.data(), http2=st.booleans())
async def test_random_json_to_a_connect_method_is_invalid_argument_unless_it_decodes(
    fleet: Fleet, method: Method, data: st.DataObject, http2: bool
) -> None:
    body = data.draw(json_documents(method.fields))
    answer = await send(
        fleet, method.service, "POST", method.path, body=body, headers=JSON, http2=http2
    )
    well_formed = decodes(body, "json", method.input)
    assert_connect_answer(fleet, method, answer, codec="json", well_formed=well_formed)


@pytest.mark.parametrize("method", METHODS, ids=METHOD_IDS)
@FUZZ_SETTINGS
@given(message=protobuf_messages(), http2=st.booleans())
async def test_random_protobuf_fields_are_invalid_argument_unless_they_decode(
    fleet: Fleet, method: Method, message: bytes, http2: bool
) -> None:
    answer = await send(
        fleet, method.service, "POST", method.path, body=message,
        headers={"content-type": "application/proto"}, http2=http2,
    )  # fmt: skip
    well_formed = decodes(message, "proto", method.input)
    assert_connect_answer(fleet, method, answer, codec="proto", well_formed=well_formed)


@pytest.mark.parametrize("method", METHODS, ids=METHOD_IDS)
@FUZZ_SETTINGS
@given(
    body=st.binary(max_size=256),
    content_type=st.sampled_from(OTHER_TYPES) | header_text,
    http2=st.booleans(),
)
async def test_a_content_type_connect_does_not_serve_is_415(
    fleet: Fleet, method: Method, body: bytes, content_type: str, http2: bool
) -> None:
    if connect_unary_codec(content_type) is not None or content_type.startswith("application/grpc"):
        return  # a served type: the other tests' business
    headers = {"content-type": content_type} if content_type else {}
    answer = await send(
        fleet, method.service, "POST", method.path, body=body, headers=headers, http2=http2
    )
    assert_alive(fleet, method.service, answer)
    assert answer.status == 415, answer


@pytest.mark.parametrize("method", METHODS, ids=METHOD_IDS)
@FUZZ_SETTINGS
@given(headers=protocol_headers, http2=st.booleans())
async def test_random_protocol_headers_get_a_connect_error_or_the_answer(
    fleet: Fleet, method: Method, headers: dict[str, str], http2: bool
) -> None:
    body = json.dumps(VALID[method.path](fleet)).encode()
    answer = await send(
        fleet, method.service, "POST", method.path, body=body,
        headers={**headers, **JSON}, http2=http2,
    )  # fmt: skip
    assert_alive(fleet, method.service, answer)
    if answer.status == 200:
        assert decodes(answer.body, "json", method.output)
        return
    # A refused header: a bad version, timeout or (un)compressed body is invalid_argument.
    allowed = {"invalid_argument"}
    if headers.get("content-encoding", "").lower() not in {"", "identity", "gzip"}:
        allowed.add("unimplemented")  # an unknown compression
    if "connect-timeout-ms" in headers:
        # A deadline so short it ran out. greeter answers `canceled` when it runs out during
        # its call to caller (the client call is cancelled), not `deadline_exceeded`.
        allowed |= {"deadline_exceeded", "canceled"}
    assert connect_code(answer) in allowed, answer


PROTO_FRAMINGS = ["application/grpc", "application/grpc+proto", "application/grpc-web+proto"]


@pytest.mark.parametrize("method", METHODS, ids=METHOD_IDS)
@FUZZ_SETTINGS
@given(
    message=protobuf_messages(), content_type=st.sampled_from(PROTO_FRAMINGS), http2=st.booleans()
)
async def test_random_protobuf_in_grpc_frames_gets_a_grpc_status(
    fleet: Fleet, method: Method, message: bytes, content_type: str, http2: bool
) -> None:
    headers = {"content-type": content_type}
    grpc = not content_type.startswith("application/grpc-web")
    if grpc:
        headers["te"] = "trailers"
    answer = await send(
        fleet, method.service, "POST", method.path, body=envelope(message),
        headers=headers, http2=http2,
    )  # fmt: skip
    assert_alive(fleet, method.service, answer)
    status = grpc_status(answer)
    if grpc and not http2:
        assert status == "unimplemented"  # gRPC needs HTTP/2's trailers
    elif not decodes(message, "proto", method.input):
        assert status == "invalid_argument", answer
    else:
        assert status == "ok" or status in SERVICE_CODES, answer


GREET = "/greeter.v1.GreeterService/Greet"


@FUZZ_SETTINGS
@given(
    message=protobuf_messages() | st.binary(max_size=64),
    encoding=st.sampled_from(["proto", "json", "xml"]) | header_text,
    as_base64=st.booleans(),
)
async def test_random_connect_get_query_is_415_or_invalid_argument_unless_it_decodes(
    fleet: Fleet, message: bytes, encoding: str, as_base64: bool
) -> None:
    # Greet is NO_SIDE_EFFECTS, so it also answers Connect GET with the message in the URL.
    [greet] = [m for m in METHODS if m.path == GREET]
    value = base64.urlsafe_b64encode(message).decode() if as_base64 else message.decode("latin-1")
    query = {"encoding": encoding, "message": value, **({"base64": "1"} if as_base64 else {})}
    async with (
        aiohttp.ClientSession() as session,
        session.get(fleet["greeter"].url + GREET, params=query) as resp,
    ):
        answer = Answer(resp.status, await resp.read(), {}, {})
    assert_alive(fleet, "greeter", answer)
    if encoding not in {"proto", "json"}:
        assert answer.status == 415, answer
        return
    # Without base64 the text travels percent-encoded as UTF-8, which is what is decoded.
    sent = message if as_base64 else value.encode()
    well_formed = decodes(sent, encoding, greet.input)
    assert_connect_answer(fleet, greet, answer, codec=encoding, well_formed=well_formed)


def test_grpc_status_reads_a_grpc_web_trailer_frame() -> None:
    # The helper above must be able to fail: a gRPC-Web body with status 3 in its trailer.
    trailer = envelope(b"grpc-status: 3\r\ngrpc-message: bad\r\n", flags=0x80)
    assert grpc_status(Answer(200, envelope(b"") + trailer, {}, {})) == "invalid_argument"
    with pytest.raises(AssertionError):
        grpc_status(Answer(200, b"", {}, {}))


def test_decodes_tells_a_broken_message_from_a_good_one() -> None:
    [greet] = [m for m in METHODS if m.path == GREET]
    assert decodes(b'{"name": "x"}', "json", greet.input)
    assert not decodes(b'{"name": 5}', "json", greet.input)
    assert not decodes(binascii.unhexlify("0a05ffffffffff"), "proto", greet.input)  # not UTF-8


# ---------------------------------------------------------------------------- REST


@pytest.mark.parametrize("post", REST_POSTS, ids=[p.path for p in REST_POSTS])
@FUZZ_SETTINGS
@given(
    body=st.binary(max_size=2048),
    content_type=st.sampled_from(["application/json", *OTHER_TYPES, *CONNECT_CODEC_TYPES])
    | header_text,
    http2=st.booleans(),
)
async def test_random_bytes_to_a_rest_post_are_415_or_400_unless_a_json_object(
    fleet: Fleet, post: RestPost, body: bytes, content_type: str, http2: bool
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    answer = await send(
        fleet, post.service, "POST", post.path, body=body, headers=headers, http2=http2
    )
    assert_alive(fleet, post.service, answer)
    if not rest_accepts(content_type):
        assert_rest_error(answer, 415)
    elif not json_object(body):
        assert_rest_error(answer, 400)
    elif answer.status != post.success:
        assert_rest_error(answer, 400, 401, 409)


@pytest.mark.parametrize("post", REST_POSTS, ids=[p.path for p in REST_POSTS])
@FUZZ_SETTINGS
@given(data=st.data(), http2=st.booleans())
async def test_random_json_to_a_rest_post_is_400_unless_an_object(
    fleet: Fleet, post: RestPost, data: st.DataObject, http2: bool
) -> None:
    body = data.draw(json_documents(post.fields))
    answer = await send(
        fleet, post.service, "POST", post.path, body=body, headers=JSON, http2=http2
    )
    assert_alive(fleet, post.service, answer)
    if not json_object(body):
        assert_rest_error(answer, 400)
    elif answer.status != post.success:
        # A field of the wrong type or value, wrong credentials, a taken email.
        assert_rest_error(answer, 400, 401, 409)


@pytest.mark.parametrize("post", REST_POSTS, ids=[p.path for p in REST_POSTS])
@FUZZ_SETTINGS
@given(headers=protocol_headers, http2=st.booleans())
async def test_protocol_headers_change_nothing_for_a_rest_post(
    fleet: Fleet, post: RestPost, headers: dict[str, str], http2: bool
) -> None:
    body = json.dumps(VALID_REST[post.path](fleet)).encode()
    answer = await send(
        fleet, post.service, "POST", post.path, body=body, headers={**headers, **JSON}, http2=http2
    )
    assert answer.status == post.success, answer


@pytest.mark.parametrize(("service", "path"), REST_GETS, ids=REST_GET_IDS)
@FUZZ_SETTINGS
@given(
    suffix=st.sampled_from(["", "/", "//", "/..", "/%00", "/x"])
    | header_text.map(lambda t: "/" + t),
    query=st.dictionaries(header_text, header_text, max_size=3),
    authorization=st.none() | header_text | header_text.map(lambda t: "Bearer " + t),
    method=st.sampled_from(["GET", "HEAD", "POST", "OPTIONS", "DELETE"]),
)
async def test_random_paths_queries_and_headers_get_a_json_error_of_their_kind(
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
        answer = Answer(resp.status, await resp.read(), {}, {})
    assert_alive(fleet, service, answer)
    if suffix == "" and method not in {"GET", "HEAD"}:
        expected: set[int] = {405}
    elif suffix == "":
        expected = {401} if path == "/verify" else {200}  # no random token is valid
    else:
        expected = {200, 401, 404, 405}  # the route with a trailing slash, or none
    assert answer.status in expected, answer
    if answer.status >= 400 and method != "HEAD":
        assert_rest_error(answer, answer.status)


# ---------------------------------------------------------------------------- afterwards


@pytest.mark.parametrize("service", SERVICE_NAMES)
async def test_service_serves_after_everything(fleet: Fleet, service: str) -> None:
    answer = await send(fleet, service, "GET", "/livez")
    assert answer.status == 200
    await assert_valid_requests_succeed(fleet, service)
    unhandled = [line for line in fleet[service].logs().splitlines() if "unhandled" in line]
    assert unhandled == [], unhandled[0][:3000]
