"""The tests' PostgreSQL: `MICROAPP_TEST_DATABASE_URL` when set, else an embedded server."""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from microapp.devdb import EmbeddedPostgres, with_database

_counter = itertools.count(1)


class TestPostgres:
    """One server for the test session; every test gets fresh databases on it."""

    __test__ = False  # not a test class, despite its name

    def __init__(self) -> None:
        self._external = os.environ.get("MICROAPP_TEST_DATABASE_URL", "").strip() or None
        self._embedded: EmbeddedPostgres | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def start(self) -> None:
        if self._external:
            return
        self._tmp = tempfile.TemporaryDirectory(prefix="microapp-pg-")
        self._embedded = EmbeddedPostgres(Path(self._tmp.name) / "data", delete_on_close=True)
        self._embedded.start()

    def close(self) -> None:
        if self._embedded is not None:
            self._embedded.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def url(self, database: str = "postgres") -> str:
        if self._external:
            return with_database(self._external, database)
        assert self._embedded is not None
        return self._embedded.url(database)

    def fresh_database(self, prefix: str) -> str:
        """Create a new, empty, uniquely named database; return its URL."""
        name = f"t_{prefix}_{os.getpid()}_{next(_counter)}"
        admin = self._external or self.url()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)


def query(url: str, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Run one query on a database and return its rows (for assertions)."""
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else []


def table_exists(url: str, table: str) -> bool:
    rows = query(url, "SELECT to_regclass(%s) IS NOT NULL", (table,))
    return bool(rows[0][0])
