"""Shared fixtures: a clean environment, the session's PostgreSQL, the external HTTP target
and the browser."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.support.browser import require_chromium
from tests.support.environment import without_service_settings
from tests.support.external import ExternalServer
from tests.support.postgres import TestPostgres


@pytest.fixture(scope="session", autouse=True)
def clean_environment() -> Iterator[dict[str, str]]:
    """No developer's `DATABASE_URL`, `PORT`, `MICROAPP_SERVER`, ... for the session."""
    with without_service_settings(os.environ) as removed:
        yield removed


@pytest.fixture(scope="session")
def postgres() -> Iterator[TestPostgres]:
    """A real PostgreSQL for the whole session (embedded unless MICROAPP_TEST_DATABASE_URL)."""
    pg = TestPostgres()
    pg.start()
    yield pg
    pg.close()


@pytest.fixture(scope="session")
async def external() -> AsyncIterator[ExternalServer]:
    """The "outside world": a real local HTTP server whose answers the test chooses."""
    async with ExternalServer() as server:
        yield server


@pytest.fixture(scope="session")
def chromium() -> str:
    """The Chromium executable; skips without one, fails under `CI=true`."""
    return require_chromium()
