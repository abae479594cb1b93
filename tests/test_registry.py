"""The registry is the single source: a seventh service is one package plus one entry.

The throwaway service below is a package written into tmp_path (its settings model and
`create_app`, serving custom-lang's generated Connect class with an implementation of its
own) and one `ServiceSpec` in a copy of the registry. A real `microapp serve` process
(`cli.main` with that registry) serves it on a free port, as it serves the six.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from microapp.platform.config import CommonSettings, ConfigError
from microapp.services import SERVICES, Call, ServiceSpec
from microapp.services.gateway.downstream import CustomLangClient
from microapp.up import wiring_env
from tests.support.polling import eventually
from tests.support.ports import free_port
from tests.support.services import ServiceProcess

TOY_APP = '''
"""A throwaway service: custom-lang's Connect API, answered its own way."""

from pydantic import Field
from starlette.applications import Starlette

from microapp.gen.customlang.v1 import customlang_pb2
from microapp.gen.customlang.v1.customlang_connect import (
    CustomLangService,
    CustomLangServiceASGIApplication,
)
from microapp.platform.config import CommonSettings, Settings, variable
from microapp.platform.db import Database
from microapp.platform.http import ConnectService, ServiceParts, build_app


class ToySettings(Settings):
    common: CommonSettings = Field(default_factory=CommonSettings)
    greeting: str = variable("TOY_GREETING", "Howdy")
    repeat: int = variable("TOY_REPEAT", 1, ge=1, le=3)


class Toy(CustomLangService):
    def __init__(self, settings: ToySettings) -> None:
        self._settings = settings

    async def invoke(self, request, ctx):
        words = " ".join([self._settings.greeting] * self._settings.repeat)
        return customlang_pb2.InvokeResponse(message=f"{words} {request.name}")


def create_app(settings: ToySettings, *, database: Database | None = None) -> Starlette:
    toy = ConnectService(CustomLangServiceASGIApplication, Toy(settings))
    return build_app(
        settings.common,
        ServiceParts(connect=[toy], proto_files=[customlang_pb2.DESCRIPTOR], database=database),
    )
'''

SERVE_TOY = """
import sys

from microapp.cli import main
from microapp.services import SERVICES, ServiceSpec
from toy import app

toy = ServiceSpec(
    name="toy",
    default_port=8099,
    otel_service_name="toy-service",
    database=None,
    migrations_package=None,
    connect_paths=("/customlang.v1.CustomLangService",),
    settings=app.ToySettings,
    create_app=app.create_app,
)
sys.exit(main(sys.argv[1:], services={**SERVICES, toy.name: toy}))
"""


def write_toy(directory: Path) -> Path:
    """The toy package and the script that serves it; returns the script."""
    (directory / "toy").mkdir()
    (directory / "toy" / "__init__.py").write_text("")
    (directory / "toy" / "app.py").write_text(textwrap.dedent(TOY_APP))
    script = directory / "serve_toy.py"
    script.write_text(SERVE_TOY)
    return script


@asynccontextmanager
async def serve_toy(tmp_path: Path, env: dict[str, str]) -> AsyncIterator[str]:
    """`microapp serve toy` on a free port, until the block ends; yields its base URL."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(write_toy(tmp_path)), "serve", "toy",
        "--host", "127.0.0.1", "--port", str(port),
        env={"PATH": "/usr/bin:/bin", **env}, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    async def healthy(session: aiohttp.ClientSession) -> bool:
        assert process.returncode is None, "the toy service exited"
        try:
            async with session.get(url + "/healthz") as resp:
                return resp.status == 200
        except aiohttp.ClientError:
            return False

    try:
        async with aiohttp.ClientSession() as session:
            await eventually(lambda: healthy(session), timeout=30)
        yield url
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()


async def test_a_throwaway_service_is_one_package_plus_one_registry_entry(tmp_path: Path) -> None:
    async with (
        serve_toy(tmp_path, {"TOY_GREETING": "Ahoy", "TOY_REPEAT": "2"}) as url,
        aiohttp.ClientSession() as session,
    ):
        async with session.get(url + "/healthz") as resp:
            assert (resp.status, await resp.text()) == (200, "ok")
        async with session.post(
            url + "/customlang.v1.CustomLangService/Invoke",
            json={"name": "Ada"},
            headers={"Content-Type": "application/json", "Connect-Protocol-Version": "1"},
        ) as resp:
            assert resp.status == 200, await resp.text()
            assert await resp.json() == {"message": "Ahoy Ahoy Ada"}


async def test_a_throwaway_services_bad_setting_exits_2_naming_it(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(write_toy(tmp_path)), "serve", "toy", "--port", str(free_port()),
        env={"PATH": "/usr/bin:/bin", "TOY_REPEAT": "9"}, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await process.communicate()
    assert process.returncode == 2
    assert stderr.decode().strip() == "microapp serve toy: TOY_REPEAT must be at most 3, got '9'"


async def test_log_level_trace_exits_2_with_one_clear_line() -> None:
    service = ServiceProcess("custom-lang", {"LOG_LEVEL": "trace"})
    with pytest.raises(RuntimeError, match="exited early"):
        await service.start()
    assert await service.stop() == 2
    assert service.logs().strip() == (
        "microapp serve custom-lang: LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got 'trace'"
    )


# --- the registry's facts, read once -------------------------------------------------------


@pytest.mark.parametrize("name", list(SERVICES))
def test_port_and_otel_name_come_from_the_registry(name: str, tmp_path: Path) -> None:
    spec = SERVICES[name]
    settings = spec.read_settings({"AUTH_DEV_KEY_DIR": str(tmp_path)}).common
    assert (settings.service, settings.port) == (name, spec.default_port)
    assert settings.otel_service_name == spec.otel_service_name


def test_the_environment_overrides_the_registry_defaults() -> None:
    settings = SERVICES["greeter"].read_settings({"PORT": "9999", "OTEL_SERVICE_NAME": "g"})
    assert (settings.common.port, settings.common.otel_service_name) == (9999, "g")


def test_settings_are_read_from_the_mapping_given_not_the_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PORT", "not a port")
    assert CommonSettings.from_env({"PORT": "81"}).port == 81


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PORT": "eighty"}, "PORT must be an integer, got 'eighty'"),
        ({"PORT": "70000"}, "PORT must be at most 65535, got '70000'"),
        ({"AUTH_REQUIRED": "maybe"}, "AUTH_REQUIRED must be a boolean (1/0, true/false)"),
        ({"DATABASE_URL": "mysql://db"}, "DATABASE_URL must start with postgresql://"),
        ({"CALLER_EXTERNAL_TIMEOUT_S": "soon"}, "CALLER_EXTERNAL_TIMEOUT_S must be a number"),
    ],
)
def test_a_bad_value_is_a_config_error_naming_the_variable_and_value(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        SERVICES["caller"].read_settings(env)
    assert str(caught.value).startswith(message)


def test_values_keep_their_formats() -> None:
    settings = SERVICES["caller"].read_settings(
        {
            "CALLER_ALLOWED_HOSTS": " a.example, b.example ,,",
            "CALLER_ALLOW_PRIVATE_NETWORKS": "true",
            "CORS_ALLOWED_ORIGINS": "*",
            "CALLER_EXTERNAL_TIMEOUT_S": "0.5",
            "ACCESS_LOG": "0",
            "LOG_LEVEL": "debug",
            "HOST": "",  # empty: the default
        }
    )
    assert settings.allowed_hosts == ("a.example", "b.example")
    assert settings.allow_private_networks is True
    assert settings.common.cors_allowed_origins == ("*",)
    assert settings.external_timeout_s == 0.5
    assert (settings.common.access_log, settings.common.log_level) == (False, "DEBUG")
    assert settings.common.host == "0.0.0.0"


def test_up_wires_every_call_the_registry_declares_and_only_those() -> None:
    ports = {name: spec.default_port for name, spec in SERVICES.items()}
    env = wiring_env(ports, "http://127.0.0.1:1/")
    for spec in SERVICES.values():
        for call in spec.calls:
            wired = env.get(call.variable)
            if call.proxied:
                assert wired is None, call
            else:
                assert wired == f"http://127.0.0.1:{ports[call.service]}{call.path}", call
    declared = {call.variable for spec in SERVICES.values() for call in spec.calls}
    # Beside the calls: greeter's external target, caller's loopback permission, and the
    # console's origins.
    assert set(env) - declared == {
        "EXTERNAL_API_URL",
        "CALLER_ALLOW_PRIVATE_NETWORKS",
        "CORS_ALLOWED_ORIGINS",
    }


def test_up_wires_a_new_services_call_from_its_registry_entry() -> None:
    newcomer = ServiceSpec(
        name="newcomer",
        default_port=8099,
        otel_service_name="newcomer",
        database=None,
        migrations_package=None,
        connect_paths=(),
        settings=SERVICES["web"].settings,
        create_app=SERVICES["web"].create_app,
        calls=(Call("gateway", "NEWCOMER_GATEWAY_URL"),),
    )
    services = {**SERVICES, newcomer.name: newcomer}
    ports = {name: spec.default_port for name, spec in services.items()}
    env = wiring_env(ports, "http://127.0.0.1:1/", services)
    assert env["NEWCOMER_GATEWAY_URL"] == f"http://127.0.0.1:{ports['gateway']}"


# --- structure: no import cycle, resources only inside their block -------------------------


def test_authn_stands_without_the_http_app_module() -> None:
    # authn offers a token check that build_app composes; it never imports http back.
    code = "import sys, microapp.platform.authn; print('microapp.platform.http' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (result.returncode, result.stdout.strip()) == (0, "False"), result.stderr


async def test_an_http_client_has_its_session_only_inside_its_block() -> None:
    client = CustomLangClient("http://127.0.0.1:1")
    with pytest.raises(RuntimeError, match="outside its `async with` block"):
        _ = client.session
    async with client:
        session = client.session
        assert not session.closed
    assert session.closed
    with pytest.raises(RuntimeError):
        _ = client.session
