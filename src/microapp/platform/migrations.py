"""Versioned SQL migrations, applied under an advisory lock so that replicas may start together."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable

from psycopg import AsyncConnection

from microapp.platform.trusted_sql import trusted_sql

logger = logging.getLogger(__name__)

# One lock key for every microapp migration run on a database; replicas of the same
# service queue behind each other instead of racing to create the same table.
_LOCK_KEY = 0x6D6963726F617070  # "microapp"
_FILE_NAME = re.compile(r"^(\d+)_([a-z0-9_]+)\.sql$")

_CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True)
class Migration:
    """One SQL file: `NNN_name.sql`, applied once, in version order."""

    version: int
    name: str
    sql: str


def load_migrations(package: str) -> list[Migration]:
    """Read `<package>/migrations/NNN_name.sql` in version order; refuse duplicates."""
    folder: Traversable = resources.files(package).joinpath("migrations")
    found: dict[int, Migration] = {}
    for entry in folder.iterdir():
        match = _FILE_NAME.match(entry.name)
        if not match:
            continue
        version = int(match.group(1))
        if version in found:
            raise ValueError(f"{package}: two migrations share version {version}")
        found[version] = Migration(version, match.group(2), entry.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


async def apply_migrations(conn: AsyncConnection, migrations: list[Migration]) -> list[int]:
    """Apply the migrations this database has not seen; return the versions applied.

    Each migration runs in its own transaction with its ledger row, so a failure leaves
    the database at the last good version.
    """
    applied_now: list[int] = []
    await conn.set_autocommit(True)
    await conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
    try:
        await conn.execute(_CREATE_LEDGER)
        cursor = await conn.execute("SELECT version FROM schema_migrations")
        done = {row[0] for row in await cursor.fetchall()}
        for migration in migrations:
            if migration.version in done:
                continue
            async with conn.transaction():
                await conn.execute(trusted_sql(migration.sql))
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                    (migration.version, migration.name),
                )
            logger.info(
                "applied migration",
                extra={"version": migration.version, "migration": migration.name},
            )
            applied_now.append(migration.version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
    return applied_now
