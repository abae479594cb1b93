"""Coalesced synchronous writes (issue 18): batched commits that keep "the row exists before
the answer", against a real PostgreSQL and real custom-lang processes."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import psycopg
import pytest

from microapp.devdb import EmbeddedPostgres
from microapp.platform.coalesce import CoalesceSettings, MultiRowInsert
from microapp.platform.config import ConfigError
from microapp.platform.db import Database
from microapp.platform.migrations import load_migrations
from microapp.services.customlang.service import INSERT_EXECUTION
from tests.support.otlp import OtlpReceiver
from tests.support.polling import eventually
from tests.support.postgres import TestPostgres, query
from tests.support.services import ServiceProcess

CUSTOMLANG_MIGRATIONS = "microapp.services.customlang"
FAST_METRICS = {"OTEL_METRIC_EXPORT_INTERVAL": "200", "ACCESS_LOG": "0"}


# --- pure pieces -------------------------------------------------------------------------------


def test_the_multi_row_statement_repeats_the_row_of_the_single_one() -> None:
    insert = MultiRowInsert("INSERT INTO t (a, b) VALUES (%s, %s)")
    assert insert.sql(1) == "INSERT INTO t (a, b) VALUES (%s, %s)"
    assert insert.sql(3) == "INSERT INTO t (a, b) VALUES (%s, %s), (%s, %s), (%s, %s)"


def test_a_statement_that_is_not_a_plain_insert_is_refused() -> None:
    with pytest.raises(ValueError, match="single-row INSERT"):
        MultiRowInsert("UPDATE t SET a = %s")


def test_coalescing_settings_are_read_and_checked() -> None:
    assert CoalesceSettings.from_env({}) == CoalesceSettings(enabled=True, max_batch=100)
    off = CoalesceSettings.from_env({"DB_COALESCE": "0", "DB_COALESCE_MAX_BATCH": "7"})
    assert off == CoalesceSettings(enabled=False, max_batch=7)
    with pytest.raises(ConfigError, match="DB_COALESCE_MAX_BATCH"):
        CoalesceSettings.from_env({"DB_COALESCE_MAX_BATCH": "0"})


# --- the Database API on a real PostgreSQL -------------------------------------------------------


@pytest.fixture
async def database(postgres: TestPostgres) -> AsyncIterator[tuple[Database, str]]:
    url = postgres.fresh_database("coal")
    db = Database(url, load_migrations(CUSTOMLANG_MIGRATIONS))
    await db.start()
    await db.wait_ready()
    yield db, url
    await db.close()


def _names(url: str) -> list[str]:
    return [row[0] for row in query(url, "SELECT name FROM executions")]


async def test_a_lone_write_is_flushed_alone_and_committed_when_it_returns(
    database: tuple[Database, str],
) -> None:
    db, url = database
    await db.record(INSERT_EXECUTION, ("alone", "Hello alone", 200))
    assert _names(url) == ["alone"]
    assert (db.coalesced_flushes, db.largest_coalesced_batch) == (1, 1)


async def test_concurrent_writes_share_commits_and_each_returns_after_its_own_row(
    database: tuple[Database, str],
) -> None:
    db, url = database

    async def write_then_look(name: str) -> bool:
        await db.record(INSERT_EXECUTION, (name, f"Hello {name}", 200))
        return bool(query(url, "SELECT 1 FROM executions WHERE name = %s", (name,)))

    found = await asyncio.gather(*(write_then_look(f"n{i}") for i in range(100)))
    assert all(found)
    assert sorted(_names(url)) == sorted(f"n{i}" for i in range(100))
    assert db.coalesced_rows == 100
    assert db.coalesced_flushes < 100
    assert db.largest_coalesced_batch > 1


async def test_one_refused_row_fails_only_its_own_write(database: tuple[Database, str]) -> None:
    db, url = database
    rows = [(f"ok{i}", "Hello", 200) for i in range(50)]
    # An integer beyond the column's range: refused by the server itself, inside a batch.
    rows.insert(25, ("too-big", "Hello", 2**40))
    results = await asyncio.gather(
        *(db.record(INSERT_EXECUTION, row) for row in rows), return_exceptions=True
    )

    failures = {row[0]: r for row, r in zip(rows, results, strict=True) if r is not None}
    assert list(failures) == ["too-big"]
    assert isinstance(failures["too-big"], psycopg.errors.NumericValueOutOfRange)
    stored = _names(url)
    assert sorted(stored) == sorted(f"ok{i}" for i in range(50))  # each once
    assert db.unrecorded_writes == 1
    assert db.ready


async def test_without_coalescing_each_write_is_its_own_insert(postgres: TestPostgres) -> None:
    url = postgres.fresh_database("nocoal")
    db = Database(
        url, load_migrations(CUSTOMLANG_MIGRATIONS), coalesce=CoalesceSettings(enabled=False)
    )
    await db.start()
    try:
        await db.wait_ready()
        await asyncio.gather(
            *(db.record(INSERT_EXECUTION, (f"n{i}", "Hi", 200)) for i in range(20))
        )
    finally:
        await db.close()
    assert len(_names(url)) == 20
    assert db.coalesced_flushes == 0


# --- a real custom-lang service ---------------------------------------------------------------


@pytest.fixture
async def receiver() -> AsyncIterator[OtlpReceiver]:
    otlp = OtlpReceiver()
    await otlp.start()
    yield otlp
    await otlp.close()


class _RowChecker:
    """Asks PostgreSQL whether a name's row exists, on one connection shared by all checks."""

    def __init__(self, conn: psycopg.AsyncConnection) -> None:
        self._conn = conn
        self._lock = asyncio.Lock()

    async def stored(self, name: str) -> bool:
        async with self._lock:
            cur = await self._conn.execute("SELECT 1 FROM executions WHERE name = %s", (name,))
            return await cur.fetchone() is not None


async def _invoke(session: aiohttp.ClientSession, base: str, name: str) -> None:
    async with session.post(base + "/invoke", json={"name": name}) as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["message"] == f"Hello {name} from custom-lang-service!"


async def test_under_200_concurrent_calls_every_answer_finds_its_row_and_flushes_batch(
    postgres: TestPostgres, receiver: OtlpReceiver
) -> None:
    url = postgres.fresh_database("coal200")
    env = {"DATABASE_URL": url, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, **FAST_METRICS}
    async with (
        ServiceProcess("custom-lang", env) as svc,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
        await psycopg.AsyncConnection.connect(url, autocommit=True) as conn,
    ):
        await svc.wait_for("/healthz", 200)
        checker = _RowChecker(conn)

        async def call_then_look(name: str) -> bool:
            await _invoke(session, svc.url, name)
            return await checker.stored(name)

        names = [f"c200-{i}" for i in range(200)]
        found = await asyncio.gather(*(call_then_look(n) for n in names))
        assert all(found)
        largest = await eventually(
            lambda: (
                receiver.metric_values.get("microapp.db.coalesce.max_batch", 0) > 1
                and receiver.metric_values["microapp.db.coalesce.max_batch"]
            )
        )
        await eventually(lambda: receiver.metric_values.get("microapp.db.coalesce.rows") == 200)
    assert 1 < largest <= 100
    assert receiver.metric_values["microapp.db.coalesce.flushes"] < 200
    assert sorted(_names(url)) == sorted(names)


async def test_an_idle_service_writes_a_single_call_without_waiting_for_company(
    postgres: TestPostgres,
) -> None:
    url = postgres.fresh_database("coalidle")
    async with (
        ServiceProcess("custom-lang", {"DATABASE_URL": url, "ACCESS_LOG": "0"}) as svc,
        aiohttp.ClientSession() as session,
    ):
        await svc.wait_for("/healthz", 200)
        await _invoke(session, svc.url, "lonely")
        # Queried as soon as the answer arrives: no other call ever came to fill a batch.
        assert _names(url) == ["lonely"]


@pytest.fixture
def stoppable_postgres() -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL of this test's own, so stopping it disturbs no other test.

    Kept directly under the temporary directory, as the session's server is: pytest keeps
    its own base directory private to root, where the server's system user cannot reach.
    """
    with tempfile.TemporaryDirectory(prefix="microapp-pg-coalesce-") as tmp:
        pg = EmbeddedPostgres(Path(tmp) / "pgdata", delete_on_close=True)
        pg.start()
        pg.create_databases(["customlang_db"])
        yield pg
        pg.close()


async def test_a_database_restart_mid_load_duplicates_nothing_and_loses_no_answer_untold(
    stoppable_postgres: EmbeddedPostgres, receiver: OtlpReceiver
) -> None:
    pg = stoppable_postgres
    url = pg.url("customlang_db")
    env = {"DATABASE_URL": url, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, **FAST_METRICS}
    answered: list[str] = []
    stop = asyncio.Event()

    async def worker(session: aiohttp.ClientSession, base: str, index: int) -> None:
        for n in range(100_000):
            if stop.is_set():
                return
            name = f"w{index}-{n}"
            await _invoke(session, base, name)
            answered.append(name)

    async with (
        ServiceProcess("custom-lang", env) as svc,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
    ):
        await svc.wait_for("/healthz", 200)
        workers = [asyncio.create_task(worker(session, svc.url, i)) for i in range(20)]
        try:
            await eventually(lambda: len(answered) >= 200, timeout=30)
            await asyncio.to_thread(pg.stop)
            during = len(answered)
            # The service keeps answering while its database is away.
            await eventually(lambda: len(answered) >= during + 100, timeout=30)
            await asyncio.to_thread(pg.start)
            await svc.wait_for("/healthz", 200)
            after = len(answered)
            await eventually(lambda: len(answered) >= after + 200, timeout=30)
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.gather(*workers)
        for task in workers:
            assert task.exception() is None
        rows = _names(url)
        missing = set(answered) - set(rows)
        # Every answered call whose row is missing was counted as unrecorded.
        unrecorded = await eventually(
            lambda: (
                receiver.metric_values.get("microapp.db.unrecorded_writes", 0) >= len(missing)
                and receiver.metric_values["microapp.db.unrecorded_writes"]
            )
        )

    assert len(rows) == len(set(rows)), "a row was stored twice"
    assert set(rows) <= set(answered)
    assert missing, "no call fell into the outage"
    assert len(missing) <= unrecorded <= len(answered)
    # Stored before the outage and again after it.
    assert len(rows) >= 400
