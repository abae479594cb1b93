"""The web console in a real Chromium against real service processes.

The console is served by `microapp serve web`; its Connect-web clients call real auth, greeter
(which requires a token, as it does behind Traefik's forwardAuth), caller, gateway and
custom-lang processes, which allow the console's origin by CORS.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from playwright.async_api import Browser, BrowserContext, Page, Request, async_playwright, expect

from tests.support.browser import (
    ARTIFACTS,
    CHROMIUM_ARGS,
    ROOT,
    ServiceGroup,
    require_chromium,
    service_on_port,
)
from tests.support.commands import BIN
from tests.support.external import ExternalServer
from tests.support.node import require_node
from tests.support.polling import eventually
from tests.support.ports import free_port
from tests.support.postgres import TestPostgres
from tests.support.services import ServiceProcess

EXTERNAL_BODY = 4321
PASSWORD = "correct horse battery"
SPECIAL_NAMES = ["unauthorized", "forbidden", "notfound", "conflict", "ratelimit", "unavailable"]

# Skips without a Chromium, fails under CI=true (the `chromium` fixture in conftest.py).
requires_chromium = pytest.mark.usefixtures("chromium")


@dataclass
class Stack:
    auth: ServiceProcess
    greeter: ServiceProcess
    gateway: ServiceProcess
    web: ServiceProcess
    # A gateway of its own (3 s open period) and the console pointed at it, so tripping
    # its breaker leaves the other tests' gateway alone.
    breaker_gateway: ServiceProcess
    breaker_web: ServiceProcess


@pytest.fixture(scope="module")
async def stack(
    postgres: TestPostgres, external: ExternalServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    web_port, breaker_web_port = free_port(), free_port()
    cors = {
        "CORS_ALLOWED_ORIGINS": f"http://127.0.0.1:{web_port},http://127.0.0.1:{breaker_web_port}"
    }
    caller = ServiceProcess("caller")
    auth = ServiceProcess(
        "auth",
        {
            **cors,
            "DATABASE_URL": postgres.fresh_database("web_auth"),
            "AUTH_DEV_KEY_DIR": str(tmp_path_factory.mktemp("auth-keys")),
        },
    )
    greeter = ServiceProcess(
        "greeter",
        {
            **cors,
            "CALLER_BASE_URL": caller.url,
            "EXTERNAL_API_URL": external.url(status=200, size=EXTERNAL_BODY),
            "AUTH_REQUIRED": "1",
            "AUTH_JWKS_URL": f"{auth.url}/.well-known/jwks.json",
        },
    )
    custom_lang = ServiceProcess("custom-lang")
    gateway = ServiceProcess("gateway", {**cors, "CUSTOM_LANG_BASE_URL": custom_lang.url})
    breaker_gateway = ServiceProcess(
        "gateway",
        {**cors, "CUSTOM_LANG_BASE_URL": custom_lang.url, "GATEWAY_BREAKER_OPEN_S": "3"},
    )
    urls = {"WEB_AUTH_BASE_URL": auth.url, "WEB_GREETER_BASE_URL": greeter.url}
    web = service_on_port("web", web_port, {**urls, "WEB_GATEWAY_BASE_URL": gateway.url})
    breaker_web = service_on_port(
        "web",
        breaker_web_port,
        {**urls, "WEB_GATEWAY_BASE_URL": breaker_gateway.url, "WEB_BREAKER_POLL_MS": "200"},
    )
    services = [caller, auth, greeter, custom_lang, gateway, breaker_gateway, web, breaker_web]
    async with ServiceGroup(services):
        await auth.wait_for("/healthz", 200)
        yield Stack(auth, greeter, gateway, web, breaker_gateway, breaker_web)


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    executable = require_chromium()
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield chromium
        await chromium.close()


@pytest.fixture
async def context(browser: Browser) -> AsyncIterator[BrowserContext]:
    """A fresh browser profile per test: nobody logged in, default protocol."""
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    yield context
    await context.close()


async def open_console(
    context: BrowserContext, web: ServiceProcess, *, protocol: str | None = None
) -> Page:
    page = await context.new_page()
    await page.goto(web.url + "/" + (f"?protocol={protocol}" if protocol else ""))
    await expect(page.locator("body")).to_have_attribute("data-ready", "true")
    return page


async def register(page: Page, email: str, password: str = PASSWORD) -> None:
    await page.fill("#auth-email", email)
    await page.fill("#auth-password", password)
    await page.click("#auth-register")
    await expect(page.locator("#auth-result")).to_have_attribute("data-state", "ok")


async def log_in(page: Page, email: str, password: str = PASSWORD) -> None:
    await page.fill("#auth-email", email)
    await page.fill("#auth-password", password)
    await page.click("#auth-login")
    await expect(page.locator("#auth-who")).to_have_attribute("data-state", "logged-in")


async def register_and_log_in(page: Page) -> str:
    email = f"web-{uuid.uuid4().hex[:10]}@example.com"
    await register(page, email)
    await log_in(page, email)
    return email


async def greet(page: Page, name: str) -> None:
    await page.fill("#greeter-name", name)
    await page.click("#greeter-submit")
    await expect(page.locator("#greeter-result")).not_to_have_attribute("data-state", "pending")


async def invoke_special(page: Page, name: str) -> None:
    await page.click(f'#gateway-specials button[data-name="{name}"]')
    await expect(page.locator("#gateway-result")).not_to_have_attribute("data-state", "pending")


async def stored_token(page: Page) -> str:
    return await page.evaluate("JSON.parse(localStorage.getItem('microapp.session')).token")


def is_call(path: str) -> Callable[[Request], bool]:
    """Matches the call itself, not its CORS preflight."""
    return lambda request: path in request.url and request.method != "OPTIONS"


# --- auth --------------------------------------------------------------------------------


@requires_chromium
async def test_register_then_log_in_shows_who_is_logged_in(
    context: BrowserContext, stack: Stack
) -> None:
    page = await open_console(context, stack.web)
    await expect(page.locator("#auth-who")).to_have_attribute("data-state", "anonymous")
    email = f"ada-{uuid.uuid4().hex[:8]}@example.com"

    await register(page, email)
    await expect(page.locator("#auth-registered")).to_contain_text(email)
    registered_id = (await page.locator("#auth-result dd").nth(1).inner_text()).strip()

    await log_in(page, email)
    await expect(page.locator("#auth-email-shown")).to_have_text(email)
    await expect(page.locator("#auth-role")).to_have_text("user")
    await expect(page.locator("#auth-user-id")).to_have_text(registered_id)


@requires_chromium
async def test_login_is_kept_across_a_reload(context: BrowserContext, stack: Stack) -> None:
    page = await open_console(context, stack.web)
    email = await register_and_log_in(page)
    await page.reload()
    await expect(page.locator("body")).to_have_attribute("data-ready", "true")
    await expect(page.locator("#auth-who")).to_have_attribute("data-state", "logged-in")
    await expect(page.locator("#auth-email-shown")).to_have_text(email)


@requires_chromium
async def test_wrong_password_shows_unauthenticated(context: BrowserContext, stack: Stack) -> None:
    page = await open_console(context, stack.web)
    email = f"web-{uuid.uuid4().hex[:10]}@example.com"
    await register(page, email)
    await page.fill("#auth-password", "not the password")
    await page.click("#auth-login")
    await expect(page.locator("#auth-result")).to_have_attribute("data-state", "error")
    await expect(page.locator("#auth-result .code")).to_have_text("unauthenticated")
    await expect(page.locator("#auth-who")).to_have_attribute("data-state", "anonymous")


# --- greeter -----------------------------------------------------------------------------


@requires_chromium
async def test_greet_shows_greeting_external_status_body_length_and_latency(
    context: BrowserContext, stack: Stack
) -> None:
    page = await open_console(context, stack.web)
    await register_and_log_in(page)
    await greet(page, "Ada")
    await expect(page.locator("#greeter-result")).to_have_attribute("data-state", "ok")
    await expect(page.locator("#greeter-message")).to_have_text("Hello Ada from greeter-service!")
    await expect(page.locator("#greeter-external-status")).to_have_text("200")
    await expect(page.locator("#greeter-body-length")).to_have_text(f"{EXTERNAL_BODY} bytes")
    await expect(page.locator("#greeter-latency")).to_have_text(re.compile(r"^\d+(\.\d)? ms$"))


@requires_chromium
async def test_calls_carry_the_token_as_bearer_after_login(
    context: BrowserContext, stack: Stack
) -> None:
    page = await open_console(context, stack.web)
    await register_and_log_in(page)
    async with page.expect_request(is_call("/greeter.v1.GreeterService/Greet")) as sent:
        await greet(page, "Bearer")
    request: Request = await sent.value
    headers = await request.all_headers()
    assert headers.get("authorization") == f"Bearer {await stored_token(page)}"
    await expect(page.locator("#greeter-result")).to_have_attribute("data-state", "ok")


@requires_chromium
async def test_greet_before_login_shows_unauthenticated(
    context: BrowserContext, stack: Stack
) -> None:
    # The greeter runs with AUTH_REQUIRED=1, as it sits behind forwardAuth in compose.
    page = await open_console(context, stack.web)
    await greet(page, "Nobody")
    await expect(page.locator("#greeter-result")).to_have_attribute("data-state", "error")
    await expect(page.locator("#greeter-result .code")).to_have_text("unauthenticated")
    await expect(page.locator("#greeter-result .message")).not_to_be_empty()


@requires_chromium
async def test_invalid_name_shows_invalid_argument(context: BrowserContext, stack: Stack) -> None:
    page = await open_console(context, stack.web)
    await register_and_log_in(page)
    await greet(page, "a" * 256)
    await expect(page.locator("#greeter-result .code")).to_have_text("invalid_argument")


# --- gateway -----------------------------------------------------------------------------


@requires_chromium
async def test_invoke_shows_custom_langs_message(context: BrowserContext, stack: Stack) -> None:
    page = await open_console(context, stack.web)
    await page.fill("#gateway-name", "Grace")
    await page.click("#gateway-submit")
    await expect(page.locator("#gateway-message")).to_have_text(
        "Hello Grace from custom-lang-service!"
    )


@requires_chromium
async def test_invoke_notfound_shows_not_found(context: BrowserContext, stack: Stack) -> None:
    page = await open_console(context, stack.web)
    await invoke_special(page, "notfound")
    await expect(page.locator("#gateway-result")).to_have_attribute("data-state", "error")
    await expect(page.locator("#gateway-result .code")).to_have_text("not_found")
    await expect(page.locator("#gateway-result .message")).not_to_be_empty()
    await expect(page.locator("#gateway-history li").first).to_contain_text("notfound → not_found")


@requires_chromium
async def test_a_button_for_each_special_name(context: BrowserContext, stack: Stack) -> None:
    page = await open_console(context, stack.web)
    names = await page.locator("#gateway-specials button").evaluate_all(
        "buttons => buttons.map(b => b.dataset.name)"
    )
    assert names == SPECIAL_NAMES


@requires_chromium
async def test_breaker_view_shows_closed_with_the_gateways_numbers(
    context: BrowserContext, stack: Stack
) -> None:
    page = await open_console(context, stack.web)
    await expect(page.locator("#breaker-state")).to_have_text("closed")
    await expect(page.locator("#breaker-failures")).to_have_text(re.compile(r"^\d+$"))
    await expect(page.locator("#breaker-tokens")).to_have_text(re.compile(r"^\d+(\.\d)?$"))


@requires_chromium
async def test_pressing_unavailable_opens_the_breaker_and_the_view_follows_it_closed_again(
    context: BrowserContext, stack: Stack
) -> None:
    page = await open_console(context, stack.breaker_web)
    breaker = page.locator("#breaker")
    await expect(breaker).to_have_attribute("data-state", "closed")
    seen = []
    for _ in range(10):
        await invoke_special(page, "unavailable")
        await expect(page.locator("#gateway-result .code")).to_have_text("unavailable")
        # The panel refreshes the view after each call, before it takes the next press.
        await expect(
            page.locator('#gateway-specials button[data-name="unavailable"]')
        ).to_be_enabled()
        seen.append(await breaker.get_attribute("data-state"))
        if seen[-1] == "open":
            break
    assert seen[-1] == "open", f"breaker view after each press: {seen}"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.locator("#breaker").screenshot(path=ARTIFACTS / "breaker-open.png")

    # After the 3 s open period the view, still polling, shows the breaker half-open;
    # three good calls close it.
    await expect(breaker).to_have_attribute("data-state", "half_open", timeout=15_000)
    for _ in range(3):
        await page.click("#gateway-submit")
        await expect(page.locator("#gateway-result")).to_have_attribute("data-state", "ok")
    await expect(breaker).to_have_attribute("data-state", "closed")


# --- greeter v2 and its stream ------------------------------------------------------------

# What the greeter logs when a stream ends before its count (greeter/service_v2.py).
STREAM_CANCELLED = re.compile(r"stream cancelled after (\d+) of (\d+) messages")
STREAM_PROTOCOLS = ["connect-json", "connect-binary", "grpc-web"]


@requires_chromium
async def test_greeter_v2_panel_greets_in_the_chosen_locale(
    context: BrowserContext, stack: Stack
) -> None:
    page = await open_console(context, stack.web)
    await register_and_log_in(page)
    await page.fill("#greeter-v2-name", "Ada")
    await page.select_option("#greeter-v2-locale", "fr")
    await page.click("#greeter-v2-submit")
    await expect(page.locator("#greeter-v2-result")).to_have_attribute("data-state", "ok")
    await expect(page.locator("#greeter-v2-message")).to_have_text(
        "Bonjour Ada de la part de greeter-service !"
    )
    await expect(page.locator("#greeter-v2-external-status")).to_have_text("200")
    await expect(page.locator("#greeter-v2-body-length")).to_have_text(f"{EXTERNAL_BODY} bytes")


async def start_stream(page: Page, name: str, *, count: int, interval_ms: int) -> None:
    await page.fill("#stream-name", name)
    await page.select_option("#stream-locale", "de")
    await page.fill("#stream-count", str(count))
    await page.fill("#stream-interval", str(interval_ms))
    await page.click("#stream-start")


@requires_chromium
@pytest.mark.parametrize("protocol", STREAM_PROTOCOLS)
async def test_stream_panel_shows_every_greeting_in_order(
    context: BrowserContext, stack: Stack, protocol: str
) -> None:
    page = await open_console(context, stack.web, protocol=protocol)
    await register_and_log_in(page)
    await start_stream(page, "Stream", count=4, interval_ms=50)
    await expect(page.locator("#stream-status")).to_have_attribute("data-state", "done")
    items = page.locator("#stream-messages li")
    await expect(items).to_have_count(4)
    assert await items.evaluate_all("items => items.map(i => i.dataset.sequence)") == [
        "1", "2", "3", "4",
    ]  # fmt: skip
    await expect(items.first.locator(".message")).to_have_text("Hallo Stream von greeter-service!")


@requires_chromium
@pytest.mark.parametrize("protocol", STREAM_PROTOCOLS)
async def test_stream_panel_shows_greetings_as_they_arrive_and_cancel_stops_the_server(
    context: BrowserContext, stack: Stack, protocol: str
) -> None:
    page = await open_console(context, stack.web, protocol=protocol)
    await register_and_log_in(page)
    stopped_before = len(STREAM_CANCELLED.findall(stack.greeter.logs()))
    await start_stream(page, "Patient", count=100, interval_ms=300)

    # Two greetings are on the page while the stream still runs: they arrive one by one.
    items = page.locator("#stream-messages li")
    await expect(items.nth(1)).to_be_visible()
    await expect(page.locator("#stream-status")).to_have_attribute("data-state", "streaming")
    await expect(page.locator("#stream-cancel")).to_be_enabled()

    await page.click("#stream-cancel")
    await expect(page.locator("#stream-status")).to_have_attribute("data-state", "cancelled")
    shown = await items.count()
    assert 2 <= shown < 100

    # The greeter saw the cancellation and ended its loop far short of 100.
    async def server_stopped() -> list[tuple[str, str]]:
        return STREAM_CANCELLED.findall(stack.greeter.logs())[stopped_before:]

    stops = await eventually(server_stopped)
    sent, count = int(stops[0][0]), int(stops[0][1])
    assert count == 100 and shown <= sent < 100
    # Nothing arrives after the cancel: the page still shows what it showed then.
    await expect(items).to_have_count(shown)
    await expect(page.locator("#stream-start")).to_be_enabled()
    await expect(page.locator("#stream-cancel")).to_be_disabled()


# --- protocols ---------------------------------------------------------------------------

# What each protocol choice must put on the wire.
GREET_WIRE = {
    # Greet is NO_SIDE_EFFECTS: Connect clients send it as a GET.
    "connect-json": ("GET", "encoding=json"),
    "connect-binary": ("GET", "encoding=proto"),
    "grpc-web": ("POST", "application/grpc-web+proto"),
}
INVOKE_CONTENT_TYPE = {
    "connect-json": "application/json",
    "connect-binary": "application/proto",
    "grpc-web": "application/grpc-web+proto",
}


@requires_chromium
@pytest.mark.parametrize("protocol", list(GREET_WIRE))
async def test_greets_over_each_protocol(
    context: BrowserContext, stack: Stack, protocol: str
) -> None:
    page = await open_console(context, stack.web, protocol=protocol)
    await register_and_log_in(page)
    async with page.expect_request(is_call("/greeter.v1.GreeterService/Greet")) as sent:
        await greet(page, protocol)
    request: Request = await sent.value
    method, evidence = GREET_WIRE[protocol]
    assert request.method == method
    wire = request.url if method == "GET" else (await request.all_headers())["content-type"]
    assert evidence in wire
    await expect(page.locator("#greeter-message")).to_have_text(
        f"Hello {protocol} from greeter-service!"
    )
    await expect(page.locator("#greeter-external-status")).to_have_text("200")


@requires_chromium
@pytest.mark.parametrize("protocol", list(INVOKE_CONTENT_TYPE))
async def test_error_codes_arrive_over_each_protocol(
    context: BrowserContext, stack: Stack, protocol: str
) -> None:
    page = await open_console(context, stack.web, protocol=protocol)
    async with page.expect_request(is_call("/gateway.v1.GatewayService/InvokeCustom")) as sent:
        await invoke_special(page, "notfound")
    request: Request = await sent.value
    assert (await request.all_headers())["content-type"] == INVOKE_CONTENT_TYPE[protocol]
    await expect(page.locator("#gateway-result .code")).to_have_text("not_found")


@requires_chromium
async def test_protocol_choice_is_kept_across_a_reload(
    context: BrowserContext, stack: Stack
) -> None:
    page = await open_console(context, stack.web)
    await page.select_option("#protocol", "grpc-web")
    await page.reload()
    await expect(page.locator("body")).to_have_attribute("data-ready", "true")
    await expect(page.locator("#protocol")).to_have_value("grpc-web")


# --- errors, layout, screenshots ---------------------------------------------------------


@requires_chromium
async def test_unreachable_service_shows_a_code_and_a_hint_not_a_blank_panel(
    context: BrowserContext, stack: Stack
) -> None:
    page = await open_console(context, stack.web)
    await page.route(re.compile(r".*/auth\.v1\.AuthService/.*"), lambda route: route.abort())
    await page.fill("#auth-email", "down@example.com")
    await page.fill("#auth-password", PASSWORD)
    await page.click("#auth-login")
    await expect(page.locator("#auth-result")).to_have_attribute("data-state", "error")
    # What connect-web makes of a failed fetch: there is no HTTP answer to take a code from.
    await expect(page.locator("#auth-result .code")).to_have_text("unknown")
    await expect(page.locator("#auth-result .message")).to_contain_text("CORS_ALLOWED_ORIGINS")


@requires_chromium
async def test_unreachable_breaker_endpoint_is_said_so(
    context: BrowserContext, stack: Stack
) -> None:
    await context.route("**/debug/breaker", lambda route: route.abort())
    page = await open_console(context, stack.web)
    await expect(page.locator("#breaker")).to_have_attribute("data-state", "unreachable")
    await expect(page.locator("#breaker-meaning")).to_contain_text("/debug/breaker")


@requires_chromium
async def test_console_fits_a_phone_screen(browser: Browser, stack: Stack) -> None:
    phone = await browser.new_context(
        viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True
    )
    try:
        page = await open_console(phone, stack.web)
        await invoke_special(page, "notfound")
        await expect(page.locator("#gateway-result .code")).to_have_text("not_found")
        overflow = await page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0, f"the page scrolls sideways by {overflow} px at phone width"
        panels = ["#auth-panel", "#greeter-panel", "#greeter-v2-panel", "#stream-panel"]
        for panel in [*panels, "#gateway-panel"]:
            box = await page.locator(panel).bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, panel
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=ARTIFACTS / "console-phone.png", full_page=True)
    finally:
        await phone.close()


@requires_chromium
async def test_a_screenshot_of_each_panel_is_saved(context: BrowserContext, stack: Stack) -> None:
    page = await open_console(context, stack.web)
    await register_and_log_in(page)
    await greet(page, "Ada")
    await expect(page.locator("#greeter-result")).to_have_attribute("data-state", "ok")
    await invoke_special(page, "notfound")
    await expect(page.locator("#breaker-state")).to_have_text("closed")
    await start_stream(page, "Ada", count=3, interval_ms=0)
    await expect(page.locator("#stream-status")).to_have_attribute("data-state", "done")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shots = {
        "auth-panel.png": page.locator("#auth-panel"),
        "greeter-panel.png": page.locator("#greeter-panel"),
        "greeter-v2-panel.png": page.locator("#greeter-v2-panel"),
        "stream-panel.png": page.locator("#stream-panel"),
        "gateway-panel.png": page.locator("#gateway-panel"),
    }
    for name, panel in shots.items():
        (ARTIFACTS / name).unlink(missing_ok=True)
        await panel.screenshot(path=ARTIFACTS / name)
    (ARTIFACTS / "console.png").unlink(missing_ok=True)
    await page.screenshot(path=ARTIFACTS / "console.png", full_page=True)
    for name in [*shots, "console.png"]:
        data = (ARTIFACTS / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5_000, name


# --- the web service itself --------------------------------------------------------------


async def test_config_json_names_the_configured_service_urls(stack: Stack) -> None:
    async with aiohttp.ClientSession() as session, session.get(f"{stack.web.url}/config.json") as r:
        assert r.status == 200
        assert r.headers["Cache-Control"] == "no-store"
        config = await r.json()
    assert config == {
        "authBaseUrl": stack.auth.url,
        "greeterBaseUrl": stack.greeter.url,
        "gatewayBaseUrl": stack.gateway.url,
        "breakerUrl": f"{stack.gateway.url}/debug/breaker",
        "breakerPollMs": 1000,
    }


async def test_config_json_defaults_to_the_consoles_own_origin() -> None:
    async with (
        ServiceProcess("web") as web,
        aiohttp.ClientSession() as session,
        session.get(f"{web.url}/config.json") as response,
    ):
        config = await response.json()
    # Empty means "this page's origin": what a reverse proxy in front of everything gives.
    assert config == {
        "authBaseUrl": "",
        "greeterBaseUrl": "",
        "gatewayBaseUrl": "",
        "breakerUrl": "",
        "breakerPollMs": 1000,
    }


async def test_page_may_call_only_its_own_origin_and_the_configured_services(stack: Stack) -> None:
    async with aiohttp.ClientSession() as session, session.get(stack.web.url + "/") as response:
        assert response.status == 200
        assert response.content_type == "text/html"
        policy = response.headers["Content-Security-Policy"]
    connect_src = re.search(r"connect-src ([^;]+)", policy)
    assert connect_src is not None
    assert set(connect_src.group(1).split()) == {
        "'self'",
        stack.auth.url,
        stack.greeter.url,
        stack.gateway.url,
    }


async def test_a_service_url_that_is_not_http_stops_web_with_a_clear_message() -> None:
    env = {**os.environ, "WEB_GREETER_BASE_URL": "ftp://greeter.example"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "microapp", "serve", "web", "--port", str(free_port()),
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(30):
        _, stderr = await process.communicate()
    assert process.returncode == 2
    assert "WEB_GREETER_BASE_URL" in stderr.decode()


async def test_breaker_relay_says_502_when_the_gateway_is_down() -> None:
    env = {"WEB_BREAKER_UPSTREAM_URL": f"http://127.0.0.1:{free_port()}/debug/breaker"}
    async with (
        ServiceProcess("web", env) as web,
        aiohttp.ClientSession() as session,
        session.get(f"{web.url}/debug/breaker") as response,
    ):
        assert response.status == 502
        body = await response.json()
    assert "gateway breaker status unreachable" in body["error"]


@requires_chromium
async def test_console_on_one_origin_reaches_the_breaker_through_the_web_service(
    context: BrowserContext, stack: Stack
) -> None:
    # As behind Traefik: no service URLs configured, so the console calls its own origin,
    # where the web service relays the gateway's /debug/breaker.
    env = {"WEB_BREAKER_UPSTREAM_URL": f"{stack.gateway.url}/debug/breaker"}
    async with ServiceProcess("web", env) as web:
        page = await open_console(context, web)
        await expect(page.locator("#endpoints")).to_contain_text(f"{web.url}/debug/breaker")
        await expect(page.locator("#breaker-state")).to_have_text("closed")
        await page.close()


async def _token_from_auth_service(auth: ServiceProcess) -> tuple[str, str]:
    """Register a fresh user over auth's REST API and log in: (email, token)."""
    email = f"breaker-{uuid.uuid4().hex[:10]}@example.com"
    credentials = {"email": email, "password": PASSWORD}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{auth.url}/auth/register", json=credentials) as response:
            assert response.status in (200, 201), await response.text()
        async with session.post(f"{auth.url}/auth/login", json=credentials) as response:
            assert response.status == 200, await response.text()
            return email, (await response.json())["token"]


@requires_chromium
async def test_console_sends_its_token_for_the_breaker_of_a_gateway_that_requires_one(
    context: BrowserContext, stack: Stack
) -> None:
    # A gateway with AUTH_REQUIRED=1, reached through the web service's relay on one origin.
    gateway_env = {
        "CUSTOM_LANG_BASE_URL": stack.gateway.url,
        "AUTH_REQUIRED": "1",
        "AUTH_JWKS_URL": f"{stack.auth.url}/.well-known/jwks.json",
    }
    async with ServiceProcess("gateway", gateway_env) as gateway:
        web_env = {"WEB_BREAKER_UPSTREAM_URL": f"{gateway.url}/debug/breaker"}
        async with ServiceProcess("web", web_env) as web:
            page = await open_console(context, web)
            await expect(page.locator("#breaker")).to_have_attribute("data-state", "unreachable")
            await expect(page.locator("#breaker-meaning")).to_contain_text("log in")

            email, token = await _token_from_auth_service(stack.auth)
            session = {"token": token, "email": email}
            await page.evaluate(
                "session => localStorage.setItem('microapp.session', JSON.stringify(session))",
                session,
            )
            await page.reload()
            await expect(page.locator("#breaker-state")).to_have_text("closed")
            await page.close()


# --- the committed build is what `make web` makes ----------------------------------------

NODE_MODULES = ROOT / "web" / "node_modules"


async def test_committed_bundle_is_what_make_web_builds(tmp_path: Path) -> None:
    require_node(
        NODE_MODULES / ".bin" / "protoc-gen-es",
        hint="`make web` runs npm ci; the console itself needs no Node.js, only rebuilding it does",
    )
    # As `make web` does, in a copy: generate the TypeScript from proto/ (it is not
    # committed: all committed generated code lives under src/microapp/gen/), then bundle.
    for name in ("buf.yaml", "buf.gen.web.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    web = tmp_path / "web"
    shutil.copytree(ROOT / "web", web, ignore=shutil.ignore_patterns("node_modules", "gen"))
    (web / "node_modules").symlink_to(NODE_MODULES)
    outfile = tmp_path / "console.js"
    for command in (
        [str(BIN / "buf"), "generate", "--template", "buf.gen.web.yaml"],
        ["node", str(web / "build.mjs")],
    ):
        process = await asyncio.create_subprocess_exec(
            *command, cwd=tmp_path, env={**os.environ, "CONSOLE_OUTFILE": str(outfile)},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(120):
            _, stderr = await process.communicate()
        assert process.returncode == 0, stderr.decode()
    committed = ROOT / "src" / "microapp" / "web" / "assets" / "console.js"
    assert outfile.read_bytes() == committed.read_bytes(), "console.js is stale, run `make web`"
