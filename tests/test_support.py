"""The test suite's own guarantees: a clean environment, and no silent skips under CI."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest

from tests.support.browser import require_chromium
from tests.support.commands import run
from tests.support.environment import (
    SERVICE_VARIABLES,
    documented_settings,
    is_service_setting,
    without_service_settings,
)
from tests.support.node import require_node
from tests.support.services import ServiceProcess

ROOT = Path(__file__).resolve().parent.parent
NOWHERE = "/nonexistent/chromium"


def test_a_missing_chromium_fails_under_ci() -> None:
    with pytest.raises(pytest.fail.Exception, match=r"CI=true.*no Chromium"):
        require_chromium([NOWHERE], env={"CI": "true"})


def test_a_missing_chromium_skips_outside_ci() -> None:
    with pytest.raises(pytest.skip.Exception, match="no Chromium"):
        require_chromium([NOWHERE], env={})


def test_a_present_chromium_is_returned() -> None:
    # Any executable stands in for the browser: the helper only looks for one.
    assert require_chromium([NOWHERE, sys.executable], env={"CI": "true"}) == sys.executable


def test_missing_node_modules_fail_under_ci(tmp_path: Path) -> None:
    with pytest.raises(pytest.fail.Exception, match="node_modules is missing: run npm ci"):
        require_node(tmp_path / "node_modules", hint="run npm ci", env={"CI": "true"})


def test_a_missing_node_binary_fails_under_ci() -> None:
    with pytest.raises(pytest.fail.Exception, match="no-such-node is not installed"):
        require_node(hint="", env={"CI": "true"}, node="no-such-node")


def test_service_settings_are_read_from_the_configuration_docs() -> None:
    documented = documented_settings()
    assert {"DATABASE_URL", "PORT", "CALLER_ALLOWED_HOSTS"} <= documented
    assert is_service_setting("OTEL_SERVICE_NAME", documented)
    assert not is_service_setting("MICROAPP_TEST_DATABASE_URL", documented)
    assert not is_service_setting("PATH", documented)


def test_without_service_settings_removes_them_and_puts_them_back() -> None:
    environ = {"DATABASE_URL": "postgresql://dev/db", "MICROAPP_SERVER": "granian", "HOME": "/h"}
    with without_service_settings(environ) as removed:
        assert environ == {"HOME": "/h"}
        assert removed == {"DATABASE_URL": "postgresql://dev/db", "MICROAPP_SERVER": "granian"}
    assert environ["DATABASE_URL"] == "postgresql://dev/db"


def test_the_session_environment_has_no_service_settings() -> None:
    documented = documented_settings()
    assert [k for k in os.environ if is_service_setting(k, documented)] == []
    inherited = ServiceProcess("greeter")._env
    assert SERVICE_VARIABLES.isdisjoint(inherited)


async def test_a_developers_service_settings_do_not_reach_the_tests() -> None:
    check = "tests/test_support.py::test_the_session_environment_has_no_service_settings"
    developer = {
        "DATABASE_URL": "postgresql://developer@127.0.0.1:1/their_db",
        "MICROAPP_SERVER": "granian",
        "PORT": "1",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1",
    }
    result = await run(
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", check,
        env={**os.environ, **developer}, cwd=str(ROOT),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


def test_a_warning_of_our_own_is_an_error() -> None:
    # pyproject.toml: filterwarnings "error:::tests" (and microapp).
    with pytest.raises(UserWarning, match="ours"):
        warnings.warn("ours", UserWarning, stacklevel=1)
