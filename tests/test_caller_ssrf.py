"""caller's defences against being used as a proxy into private networks (issue 13).

End to end against real `microapp serve caller` processes, with every target on loopback:
nothing here sends traffic off this machine. The private, link-local and metadata ranges are
tested as pure functions of the address rule, which connect nowhere.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from ipaddress import IPv4Address, ip_address
from typing import Any

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from microapp.gen.caller.v1.caller_connect import CallerServiceClient
from microapp.gen.caller.v1.caller_pb2 import CallExternalRequest
from microapp.services.caller.addresses import IPAddress, non_public_rule, numeric_host_address
from microapp.services.caller.app import CallerSettings
from microapp.services.caller.fetch import ExternalFetcher, FetchLimits
from microapp.services.caller.guard import TargetGuard, TargetRefused, guarded_socket_factory
from microapp.services.caller.service import CallerHandler
from tests.support.external import ExternalServer
from tests.support.polling import eventually
from tests.support.postgres import TestPostgres, query
from tests.support.services import ServiceProcess

HOW_TO_ALLOW = "set CALLER_ALLOW_PRIVATE_NETWORKS=1 to allow private targets"
BODY_CAP = 1000


@pytest.fixture(scope="module")
async def strict_caller() -> AsyncIterator[ServiceProcess]:
    """caller with the production default: private networks refused."""
    async with ServiceProcess("caller", {"CALLER_ALLOW_PRIVATE_NETWORKS": "0"}) as caller:
        yield caller


@dataclass
class OpenCaller:
    service: ServiceProcess
    database: str


@pytest.fixture(scope="module")
async def open_caller(postgres: TestPostgres) -> AsyncIterator[OpenCaller]:
    """caller allowed to reach loopback (as in the tests and `microapp up`), with a small cap."""
    database = postgres.fresh_database("caller_ssrf")
    env = {
        "CALLER_ALLOW_PRIVATE_NETWORKS": "1",
        "CALLER_MAX_BODY_BYTES": str(BODY_CAP),
        "DATABASE_URL": database,
    }
    async with ServiceProcess("caller", env) as caller:
        await caller.wait_for("/healthz", 200)
        yield OpenCaller(caller, database)


async def call(caller: ServiceProcess, url: str) -> Any:
    async with CallerServiceClient(caller.url) as client:
        return await client.call_external(CallExternalRequest(url=url))


async def refused(caller: ServiceProcess, url: str) -> ConnectError:
    with pytest.raises(ConnectError) as caught:
        await call(caller, url)
    return caught.value


# ---------------------------------------------------------------------------- end to end, default


@pytest.mark.parametrize(
    ("host", "shown"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("localhost", "localhost resolves to"),
        ("2130706433", "2130706433 (127.0.0.1)"),
        ("[::ffff:127.0.0.1]", "::ffff:7f00:1"),
        ("[::1]", "::1"),
    ],
)
async def test_loopback_target_is_permission_denied_naming_the_rule_and_never_reached(
    strict_caller: ServiceProcess, external: ExternalServer, host: str, shown: str
) -> None:
    before = external.requests
    error = await refused(strict_caller, f"http://{host}:{external.port}/respond?size=5")
    assert error.code == Code.PERMISSION_DENIED, error
    assert f"target {shown}" in error.message
    assert "loopback" in error.message and HOW_TO_ALLOW in error.message
    assert external.requests == before


async def test_allow_private_networks_lets_a_loopback_target_through(
    open_caller: OpenCaller, external: ExternalServer
) -> None:
    before = external.requests
    response = await call(open_caller.service, f"http://localhost:{external.port}/respond?size=5")
    assert (response.status_code, response.body_length) == (200, 5)
    assert external.requests == before + 1


# ---------------------------------------------------------------------------- redirects


def loopback_is_public_but_127_0_0_1(address: IPAddress) -> str | None:
    """The default rule, except that this test's "public" first hop, 127.0.0.2, passes."""
    return None if address == IPv4Address("127.0.0.2") else non_public_rule(address)


@pytest.fixture
async def guarded_handler() -> AsyncIterator[CallerHandler]:
    """caller's handler and fetcher as the service builds them, with the injected rule."""
    guard = TargetGuard.of(loopback_is_public_but_127_0_0_1, ())
    async with ExternalFetcher(guard) as fetcher:
        yield CallerHandler(fetcher, None)


@pytest.mark.parametrize("final_host", ["127.0.0.1", "localhost"])
async def test_redirect_from_a_public_target_to_loopback_is_permission_denied(
    guarded_handler: CallerHandler, external: ExternalServer, final_host: str
) -> None:
    before = external.requests
    final = f"http://{final_host}:{external.port}/respond?size=5"
    async with ExternalServer(host="127.0.0.2") as first:
        request = CallExternalRequest(url=first.redirect_to(final))
        with pytest.raises(ConnectError) as caught:
            await guarded_handler.call_external(request, None)  # type: ignore[arg-type]
    assert caught.value.code == Code.PERMISSION_DENIED
    assert "loopback" in caught.value.message
    assert first.requests == 1  # the first hop was fetched: it passed as public
    assert external.requests == before


async def test_the_injected_rule_lets_its_public_target_answer(
    guarded_handler: CallerHandler,
) -> None:
    # The control for the test above: the first hop alone is fetched and answered.
    async with ExternalServer(host="127.0.0.2") as target:
        request = CallExternalRequest(url=target.url_for("/page"))
        response = await guarded_handler.call_external(request, None)  # type: ignore[arg-type]
    assert response.status_code == 200
    assert target.requests == 1


async def test_redirects_are_followed_to_an_allowed_target(
    open_caller: OpenCaller, external: ExternalServer
) -> None:
    async with ExternalServer() as target:
        response = await call(open_caller.service, target.redirect_to(external.url(size=7)))
    assert (response.status_code, response.body_length) == (200, 7)


async def test_a_sixth_redirect_is_failed_precondition(open_caller: OpenCaller) -> None:
    async with ExternalServer() as target:
        error = await refused(open_caller.service, target.url_for("/loop"))
    assert error.code == Code.FAILED_PRECONDITION
    assert "redirected more than 5 times" in error.message
    assert target.requests == 6  # the URL and five redirects, no more


async def test_allowed_hosts_narrow_every_redirect_hop(external: ExternalServer) -> None:
    env = {"CALLER_ALLOWED_HOSTS": "127.0.0.1", "CALLER_ALLOW_PRIVATE_NETWORKS": "1"}
    before = external.requests
    async with ServiceProcess("caller", env) as caller, ExternalServer() as target:
        allowed = await call(caller, target.redirect_to(external.url(size=3)))
        assert allowed.body_length == 3
        elsewhere = f"http://localhost:{external.port}/respond?size=3"
        error = await refused(caller, target.redirect_to(elsewhere))
    assert error.code == Code.PERMISSION_DENIED
    assert "CALLER_ALLOWED_HOSTS" in error.message
    assert external.requests == before + 1


# ---------------------------------------------------------------------------- cookies, body, URLs


async def test_a_cookie_set_for_one_call_is_not_sent_on_the_next(open_caller: OpenCaller) -> None:
    async with ExternalServer() as target:
        await call(open_caller.service, target.url_for("/set-cookie"))
        await call(open_caller.service, target.url_for("/next"))
    assert target.received[0].path == "/set-cookie"
    assert "Cookie" not in target.received[1].headers


async def test_a_body_at_the_cap_is_counted(
    open_caller: OpenCaller, external: ExternalServer
) -> None:
    response = await call(open_caller.service, external.url(size=BODY_CAP))
    assert response.body_length == BODY_CAP


async def test_a_body_past_the_cap_is_resource_exhausted(
    open_caller: OpenCaller, external: ExternalServer
) -> None:
    error = await refused(open_caller.service, external.url(size=BODY_CAP + 1))
    assert error.code == Code.RESOURCE_EXHAUSTED
    assert "CALLER_MAX_BODY_BYTES" in error.message


async def test_a_streamed_body_without_length_is_stopped_past_the_cap(
    open_caller: OpenCaller,
) -> None:
    async with ExternalServer() as target:
        error = await refused(open_caller.service, target.url_for(f"/stream?size={100 * BODY_CAP}"))
    assert error.code == Code.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("bad", ["\x00", "\n", "\x1f", "\x7f", "\x85"])
async def test_url_with_a_control_character_is_invalid_argument_and_never_logged(
    open_caller: OpenCaller, external: ExternalServer, bad: str
) -> None:
    before = external.requests
    error = await refused(open_caller.service, external.url(size=11) + bad)
    assert error.code == Code.INVALID_ARGUMENT
    assert external.requests == before
    # A good call after it: once its row is written, the refused URL's would have been too.
    good = external.url(size=20 + ord(bad))
    await call(open_caller.service, good)

    def logged() -> set[str]:
        return {row[0] for row in query(open_caller.database, "SELECT url FROM call_logs")}

    urls = await eventually(lambda: good in logged() and logged())
    assert [url for url in urls if bad in url] == []


@pytest.mark.parametrize("url", ["http://a..b/", "http://exa\u00admple.com/"])
async def test_url_whose_host_cannot_be_encoded_is_invalid_argument(
    open_caller: OpenCaller, url: str
) -> None:
    error = await refused(open_caller.service, url)
    assert error.code == Code.INVALID_ARGUMENT


async def test_redirect_to_a_host_that_cannot_be_looked_up_is_unavailable(
    open_caller: OpenCaller,
) -> None:
    # Python's resolver refuses to encode the name, before any lookup leaves the machine.
    async with ExternalServer() as target:
        error = await refused(open_caller.service, target.redirect_to("http://a..b/"))
    assert error.code == Code.UNAVAILABLE
    assert "cannot be looked up" in error.message


# ---------------------------------------------------------------------------- the address rule


@pytest.mark.parametrize(
    ("address", "rule"),
    [
        ("10.0.0.1", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),
        ("100.64.0.1", "shared (carrier-grade NAT)"),
        ("fd00::1", "unique-local"),
        ("fd00:ec2::254", "unique-local"),
        ("fe80::1", "link-local"),
        ("::ffff:10.0.0.1", "private"),
        ("::ffff:169.254.169.254", "link-local"),
        ("64:ff9b::a9fe:a9fe", "link-local"),
        ("2002:c0a8:0101::1", "private"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("127.0.0.1", "loopback"),
        ("127.0.0.2", "loopback"),
        ("::1", "loopback"),
        ("192.0.2.1", "special-purpose (not globally routable)"),
        ("198.18.0.1", "special-purpose (not globally routable)"),
        ("2001:db8::1", "special-purpose (not globally routable)"),
    ],
)
def test_address_rule_refuses_non_public_addresses_by_name(address: str, rule: str) -> None:
    assert non_public_rule(ip_address(address)) == rule


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.8.8"])
def test_address_rule_allows_public_unicast(address: str) -> None:
    assert non_public_rule(ip_address(address)) is None


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("2130706433", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("017700000001", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("[::ffff:127.0.0.1]", "::ffff:127.0.0.1"),
        ("169.254.169.254", "169.254.169.254"),
    ],
)
def test_numeric_hosts_are_read_as_the_address_they_stand_for(host: str, address: str) -> None:
    assert numeric_host_address(host) == ip_address(address)


@pytest.mark.parametrize("host", ["localhost", "example.com", "10.0.0.1.example.com", "1e100"])
def test_names_are_not_numeric_hosts(host: str) -> None:
    assert numeric_host_address(host) is None


def test_settings_refuse_private_networks_unless_told() -> None:
    assert CallerSettings.from_env({}).allow_private_networks is False
    assert CallerSettings.from_env({"CALLER_ALLOW_PRIVATE_NETWORKS": "1"}).allow_private_networks
    assert CallerSettings.from_env({}).max_body_bytes == 10 * 1024 * 1024
    assert FetchLimits().max_redirects == 5


def test_socket_factory_refuses_a_socket_to_a_refused_address() -> None:
    create = guarded_socket_factory(TargetGuard.of(non_public_rule, ()))
    with pytest.raises(TargetRefused, match=r"target 169\.254\.169\.254 is link-local"):
        create((socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", 80)))
    # A public address gets its socket (created, never connected here).
    create((socket.AF_INET, socket.SOCK_STREAM, 6, "", ("8.8.8.8", 80))).close()
