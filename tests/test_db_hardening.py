"""The database write path under bad rows, bugs, query errors and /healthz storms (issue 13).

Real PostgreSQL throughout; the only fake is a `Database` wrapper that raises once, at
the seam the write-behind queue is built on.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import psycopg
import pytest

from microapp.platform.db import Database, DatabaseUnavailable, connection_lost
from microapp.platform.migrations import load_migrations
from microapp.platform.writebehind import WriteBehindQueue
from microapp.services.caller.service import INSERT_CALL_LOG
from tests.support.polling import eventually
from tests.support.postgres import TestPostgres, query
from tests.support.services import ServiceProcess

CALLER_MIGRATIONS = "microapp.services.caller"


@pytest.fixture
async def caller_db(postgres: TestPostgres) -> AsyncIterator[tuple[Database, str]]:
    """caller's schema on a fresh database, behind a started `Database`."""
    url = postgres.fresh_database("hard")
    database = Database(url, load_migrations(CALLER_MIGRATIONS))
    await database.start()
    await database.wait_ready()
    yield database, url
    await database.close()


def _urls(url: str) -> list[str]:
    return [row[0] for row in query(url, "SELECT url FROM call_logs ORDER BY url")]


# --- what counts as an outage (a pure function: no connection) ----------------------


@pytest.mark.parametrize(
    "error",
    [
        psycopg.errors.DeadlockDetected("deadlock detected"),
        psycopg.errors.QueryCanceled("canceling statement due to statement timeout"),
        psycopg.errors.TooManyConnections("sorry, too many clients already"),
        psycopg.errors.SerializationFailure("could not serialize access"),
        psycopg.errors.UniqueViolation("duplicate key"),
        psycopg.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes"),
    ],
)
def test_a_query_error_is_not_a_lost_connection(error: psycopg.Error) -> None:
    assert not connection_lost(error)


@pytest.mark.parametrize(
    "error",
    [
        psycopg.errors.AdminShutdown("terminating connection due to administrator command"),
        psycopg.errors.CrashShutdown("crash shutdown"),
        psycopg.errors.CannotConnectNow("the database system is starting up"),
        psycopg.errors.ConnectionFailure("connection failure"),
        psycopg.OperationalError("server closed the connection unexpectedly"),
    ],
)
def test_a_session_ending_error_is_a_lost_connection(error: psycopg.Error) -> None:
    assert connection_lost(error)


# --- write-behind ---------------------------------------------------------------------


async def test_fifty_good_rows_are_stored_beside_one_refused_row(
    caller_db: tuple[Database, str],
) -> None:
    database, url = caller_db
    queue = WriteBehindQueue(database, INSERT_CALL_LOG)
    await queue.start()
    good = [(f"http://127.0.0.1/{i:02d}", 200, i) for i in range(50)]
    # Offered before the writer runs, so the bad row travels in the same batch as the good.
    for row in good[:25]:
        assert queue.offer(row)
    assert queue.offer(("http://127.0.0.1/\x00nul", 200, 0))
    for row in good[25:]:
        assert queue.offer(row)
    await queue.close()

    assert _urls(url) == [row[0] for row in good]
    assert (queue.written, queue.refused, queue.dropped) == (50, 1, 0)


class _RaisesOnce:
    """The real database, except that `method` raises a RuntimeError the first time."""

    def __init__(self, database: Database, method: str) -> None:
        self._database = database
        self._method = method
        self.raised = False

    def _maybe_raise(self, method: str) -> None:
        if method == self._method and not self.raised:
            self.raised = True
            raise RuntimeError("injected bug")

    async def wait_ready(self) -> None:
        self._maybe_raise("wait_ready")
        await self._database.wait_ready()

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._maybe_raise("executemany")
        await self._database.executemany(sql, rows)

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        self._maybe_raise("execute")
        await self._database.execute(sql, params)


async def test_a_batch_failing_with_an_unexpected_error_is_retried_row_by_row(
    caller_db: tuple[Database, str],
) -> None:
    database, url = caller_db
    flaky = _RaisesOnce(database, "executemany")
    queue = WriteBehindQueue(flaky, INSERT_CALL_LOG)  # type: ignore[arg-type]
    await queue.start()
    for i in range(3):
        queue.offer((f"http://127.0.0.1/{i}", 200, i))
    await queue.close()
    assert flaky.raised
    assert len(_urls(url)) == 3
    assert queue.refused == 0


async def test_the_writer_survives_a_bug_and_writes_the_rows_after_it(
    caller_db: tuple[Database, str],
) -> None:
    database, url = caller_db
    flaky = _RaisesOnce(database, "wait_ready")
    queue = WriteBehindQueue(flaky, INSERT_CALL_LOG)  # type: ignore[arg-type]
    await queue.start()
    queue.offer(("http://127.0.0.1/lost-to-the-bug", 200, 0))
    await eventually(lambda: queue.refused == 1)

    queue.offer(("http://127.0.0.1/after", 200, 1))
    await queue.close()
    assert _urls(url) == ["http://127.0.0.1/after"]
    assert queue.written == 1


# --- query errors leave the database ready ------------------------------------------------


async def test_a_deadlock_fails_one_write_and_leaves_the_database_ready(
    caller_db: tuple[Database, str],
) -> None:
    database, url = caller_db
    query(url, "CREATE TABLE pair (id int PRIMARY KEY, v int)")
    query(url, "INSERT INTO pair VALUES (1, 0), (2, 0)")
    both_hold_a_lock = asyncio.Barrier(2)

    async def update(first: int, second: int) -> None:
        async with database.connection() as conn:
            await conn.execute("UPDATE pair SET v = v + 1 WHERE id = %s", (first,))
            await both_hold_a_lock.wait()
            await conn.execute("UPDATE pair SET v = v + 1 WHERE id = %s", (second,))

    results = await asyncio.gather(update(1, 2), update(2, 1), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 1
    assert isinstance(errors[0], psycopg.errors.DeadlockDetected)

    assert database.ready
    await database.execute(INSERT_CALL_LOG, ("http://127.0.0.1/next", 200, 0))
    assert _urls(url) == ["http://127.0.0.1/next"]
    assert await database.healthy()


async def test_a_cancelled_statement_fails_one_write_and_leaves_the_database_ready(
    caller_db: tuple[Database, str],
) -> None:
    database, url = caller_db
    with pytest.raises(psycopg.errors.QueryCanceled):
        async with database.connection() as conn:
            await conn.execute("SET LOCAL statement_timeout = 1")
            await conn.execute("SELECT pg_sleep(5)")
    assert database.ready
    await database.execute(INSERT_CALL_LOG, ("http://127.0.0.1/next", 200, 0))
    assert _urls(url) == ["http://127.0.0.1/next"]


async def test_a_refused_row_is_that_writes_error_only(caller_db: tuple[Database, str]) -> None:
    database, url = caller_db
    with pytest.raises(psycopg.errors.NumericValueOutOfRange):
        await database.execute(INSERT_CALL_LOG, ("http://127.0.0.1/big", 2**40, 0))
    assert database.ready
    await database.record(INSERT_CALL_LOG, ("http://127.0.0.1/next", 200, 0))
    assert _urls(url) == ["http://127.0.0.1/next"]


async def test_a_stopped_database_is_refused_at_once_not_as_a_query_error(
    postgres: TestPostgres,
) -> None:
    # Port 1 on loopback: nothing listens, the connection is refused.
    database = Database("postgresql://microapp@127.0.0.1:1/none", [])
    with pytest.raises(DatabaseUnavailable):
        await database.execute("SELECT 1")
    assert not await database.healthy()


# --- /healthz ----------------------------------------------------------------------------------


async def test_a_probe_slower_than_the_health_timeout_fails_alone_and_gates_no_write(
    postgres: TestPostgres,
) -> None:
    url = postgres.fresh_database("slowprobe")
    # A zero timeout: every probe is "slower than the timeout", deterministically.
    database = Database(url, load_migrations(CALLER_MIGRATIONS), health_timeout=0.0)
    await database.start()
    try:
        await database.wait_ready()
        assert not await database.healthy()
        assert database.ready
        await database.record(INSERT_CALL_LOG, ("http://127.0.0.1/after-probe", 200, 0))
    finally:
        await database.close()
    assert _urls(url) == ["http://127.0.0.1/after-probe"]


async def test_the_probe_reopens_its_connection_when_the_server_closed_it(
    caller_db: tuple[Database, str],
) -> None:
    database, url = caller_db
    assert await database.healthy()
    query(
        url,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    assert await database.healthy()
    assert database.ready


# --- a /healthz storm under load ---------------------------------------------------------------


def _backends(url: str) -> int:
    """Connections to this database, counting the one asking."""
    rows = query(url, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()")
    return int(rows[0][0])


async def test_a_healthz_storm_under_load_loses_no_row_and_holds_one_probe_connection(
    postgres: TestPostgres,
) -> None:
    url = postgres.fresh_database("storm")
    names = [f"storm-{i}" for i in range(300)]
    async with (
        ServiceProcess("custom-lang", {"DATABASE_URL": url, "ACCESS_LOG": "0"}) as svc,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
    ):
        await svc.wait_for("/healthz", 200)
        done = asyncio.Event()
        most_backends = 0

        async def probe() -> int:
            async with session.get(svc.url + "/healthz") as resp:
                return resp.status

        async def storm() -> list[int]:
            statuses: list[int] = []
            while not done.is_set():
                statuses += await asyncio.gather(*(probe() for _ in range(50)))
            return statuses

        async def count_backends() -> None:
            nonlocal most_backends
            while not done.is_set():
                most_backends = max(most_backends, await asyncio.to_thread(_backends, url))

        async def invoke(name: str) -> str:
            async with session.post(svc.url + "/invoke", json={"name": name}) as resp:
                assert resp.status == 200
                return (await resp.json())["message"]

        async def load() -> list[str]:
            try:
                return await asyncio.gather(*(invoke(n) for n in names))
            finally:
                done.set()

        statuses, _, answers = await asyncio.gather(storm(), count_backends(), load())

    assert answers == [f"Hello {n} from custom-lang-service!" for n in names]
    stored = [row[0] for row in query(url, "SELECT name FROM executions")]
    assert sorted(stored) == sorted(names)
    assert len(statuses) >= 50 and 200 in statuses
    # The pool (at most 10), the probe's one connection, and our own counting query.
    assert 0 < most_backends <= 12
