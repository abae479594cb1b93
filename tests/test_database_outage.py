"""A database that goes away, or is not there at startup, does not stop the services."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from microapp.devdb import EmbeddedPostgres
from microapp.gen.greeter.v1.greeter_connect import GreeterServiceClient
from microapp.gen.greeter.v1.greeter_pb2 import GreetRequest
from tests.support.external import ExternalServer
from tests.support.polling import eventually
from tests.support.postgres import query, table_exists
from tests.support.services import ServiceProcess


@pytest.fixture
def stoppable_postgres(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL of this test's own, so stopping it disturbs no other test."""
    pg = EmbeddedPostgres(tmp_path / "pgdata", delete_on_close=True)
    pg.start()
    pg.create_databases(["greeter_db", "caller_db"])
    yield pg
    pg.close()


@pytest.fixture
async def services(
    stoppable_postgres: EmbeddedPostgres, external: ExternalServer
) -> AsyncIterator[tuple[ServiceProcess, ServiceProcess]]:
    caller = ServiceProcess("caller", {"DATABASE_URL": stoppable_postgres.url("caller_db")})
    async with caller:
        env = {
            "DATABASE_URL": stoppable_postgres.url("greeter_db"),
            "CALLER_BASE_URL": caller.url,
            "EXTERNAL_API_URL": external.url(size=4),
        }
        async with ServiceProcess("greeter", env) as greeter:
            yield greeter, caller


async def _status(url: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status


async def _greet(greeter: ServiceProcess, name: str) -> str:
    async with GreeterServiceClient(greeter.url) as client:
        return (await client.greet(GreetRequest(name=name))).message


def _greeting_names(pg: EmbeddedPostgres) -> set[str]:
    return {row[0] for row in query(pg.url("greeter_db"), "SELECT name FROM greetings")}


async def test_services_ride_out_a_database_outage(
    services: tuple[ServiceProcess, ServiceProcess], stoppable_postgres: EmbeddedPostgres
) -> None:
    greeter, caller = services
    pg = stoppable_postgres
    await greeter.wait_for("/healthz", 200)
    await caller.wait_for("/healthz", 200)
    assert await _greet(greeter, "before") == "Hello before from greeter-service!"
    assert _greeting_names(pg) == {"before"}

    await asyncio.to_thread(pg.stop)
    await greeter.wait_for("/healthz", 503)
    await caller.wait_for("/healthz", 503)
    assert await _status(greeter.url + "/livez") == 200
    assert await _greet(greeter, "during") == "Hello during from greeter-service!"

    await asyncio.to_thread(pg.start)
    await greeter.wait_for("/healthz", 200)
    await caller.wait_for("/healthz", 200)
    assert await _greet(greeter, "after") == "Hello after from greeter-service!"
    # The greeting made while the database was away is logged, not stored; the one
    # after it is stored again without any restart.
    assert _greeting_names(pg) == {"before", "after"}
    # The caller's queued rows waited for the database instead of being lost.
    await eventually(lambda: len(query(pg.url("caller_db"), "SELECT 1 FROM call_logs")) == 3)


async def test_service_starts_without_its_database_and_migrates_when_it_comes(
    stoppable_postgres: EmbeddedPostgres, external: ExternalServer
) -> None:
    pg = stoppable_postgres
    url = pg.url("greeter_db")
    await asyncio.to_thread(pg.stop)
    env = {"DATABASE_URL": url, "CALLER_BASE_URL": "http://127.0.0.1:1"}
    async with ServiceProcess("greeter", env) as greeter:
        assert await _status(greeter.url + "/livez") == 200
        await greeter.wait_for("/healthz", 503)

        await asyncio.to_thread(pg.start)
        await greeter.wait_for("/healthz", 200)
    assert table_exists(url, "greetings")
