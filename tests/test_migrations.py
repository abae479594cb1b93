"""Versioned migrations: applied once, in order, safely when replicas start together."""

from __future__ import annotations

import asyncio
import sys

import psycopg
import pytest

from microapp.platform.migrations import Migration, apply_migrations, load_migrations
from microapp.services import SERVICES
from tests.support.commands import run
from tests.support.postgres import TestPostgres, query, table_exists

STEPS = [
    Migration(1, "create_things", "CREATE TABLE things (id serial PRIMARY KEY, label text)"),
    Migration(2, "add_size", "ALTER TABLE things ADD COLUMN size integer NOT NULL DEFAULT 0"),
]


async def _migrate(url: str, migrations: list[Migration]) -> list[int]:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        return await apply_migrations(conn, migrations)


async def test_migrations_apply_in_order_and_only_once(postgres: TestPostgres) -> None:
    url = postgres.fresh_database("mig_once")
    assert await _migrate(url, STEPS[:1]) == [1]
    assert await _migrate(url, STEPS) == [2]
    assert await _migrate(url, STEPS) == []
    assert query(url, "SELECT version FROM schema_migrations ORDER BY version") == [(1,), (2,)]


async def test_replicas_migrating_at_once_apply_each_migration_once(
    postgres: TestPostgres,
) -> None:
    url = postgres.fresh_database("mig_race")
    results = await asyncio.gather(*(_migrate(url, STEPS) for _ in range(8)))
    applied = sorted(v for result in results for v in result)
    assert applied == [1, 2]
    assert table_exists(url, "things")


async def test_a_failing_migration_leaves_the_last_good_version(postgres: TestPostgres) -> None:
    url = postgres.fresh_database("mig_fail")
    broken = [*STEPS, Migration(3, "broken", "ALTER TABLE nowhere ADD COLUMN x int")]
    with pytest.raises(psycopg.errors.UndefinedTable):
        await _migrate(url, broken)
    assert query(url, "SELECT max(version) FROM schema_migrations") == [(2,)]


@pytest.mark.parametrize("service", [n for n, s in SERVICES.items() if s.migrations_package])
def test_every_service_ships_numbered_migrations(service: str) -> None:
    package = SERVICES[service].migrations_package
    assert package is not None
    migrations = load_migrations(package)
    assert migrations, f"{service} has no migrations"
    assert [m.version for m in migrations] == list(range(1, len(migrations) + 1))


async def test_microapp_migrate_creates_the_services_tables(postgres: TestPostgres) -> None:
    url = postgres.fresh_database("mig_cli")
    first = await run(sys.executable, "-m", "microapp", "migrate", "greeter", "--database-url", url)
    assert first.returncode == 0, first.stderr
    assert "applied migrations 1" in first.stdout
    assert table_exists(url, "greetings")
    again = await run(sys.executable, "-m", "microapp", "migrate", "greeter", "--database-url", url)
    assert again.returncode == 0
    assert "up to date" in again.stdout


async def test_microapp_migrate_without_a_database_says_what_to_do() -> None:
    result = await run(sys.executable, "-m", "microapp", "migrate", "caller", "--database-url", "")
    assert result.returncode == 2
    assert "DATABASE_URL" in result.stderr
