"""Shared fixtures: the session's PostgreSQL and the external HTTP target."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from tests.support.external import ExternalServer
from tests.support.postgres import TestPostgres


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
    server = ExternalServer()
    await server.start()
    yield server
    await server.close()
