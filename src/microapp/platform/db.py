"""A PostgreSQL pool that survives the database being down at startup or later.

The service keeps serving while the database is away: writes are refused at once
(`DatabaseUnavailable`) instead of waiting on a dead server, `/healthz` says 503, and a
watcher reconnects and applies migrations as soon as the database answers again.

Only a lost connection marks the database down. A query error (a deadlock, a cancelled
statement, a refused row) is the error of that one write, and the next write proceeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from microapp.platform.coalesce import CoalesceSettings, CoalescingWriter
from microapp.platform.migrations import Migration, apply_migrations
from microapp.platform.resource import StartedResource
from microapp.platform.telemetry import observe
from microapp.platform.trusted_sql import trusted_sql

logger = logging.getLogger(__name__)


# Server states after which the session is gone: connection exceptions (class 08) and
# operator intervention shutting the server or this backend down (57P01-57P03).
_SESSION_ENDING_STATES = frozenset({"57P01", "57P02", "57P03"})
# A probe stuck longer than this (a server that stopped answering without closing the
# socket) is abandoned and its connection dropped.
_PROBE_GIVE_UP_S = 10.0


class DatabaseUnavailable(Exception):
    """The database is configured but cannot be used right now."""


def connection_lost(exc: BaseException, conn: AsyncConnection | None = None) -> bool:
    """True when `exc` means the connection to the database is gone, not that one query
    failed (a deadlock, a cancelled statement or a refused row leave it usable)."""
    if not isinstance(exc, psycopg.Error):
        return False
    if conn is not None and (conn.broken or conn.closed):
        return True
    state = exc.sqlstate
    if state is None:
        # Errors raised by the client itself (connect failures, a socket closed under
        # it) carry no SQLSTATE.
        return isinstance(exc, psycopg.OperationalError)
    return state.startswith("08") or state in _SESSION_ENDING_STATES


class Database(StartedResource):
    """Pool, migrations and availability of one service's database."""

    def __init__(
        self,
        url: str,
        migrations: Sequence[Migration],
        *,
        max_size: int = 10,
        acquire_timeout: float = 5.0,
        probe_interval: float = 1.0,
        health_timeout: float = 1.0,
        coalesce: CoalesceSettings | None = None,
    ) -> None:
        self._url = url
        self._migrations = list(migrations)
        self._probe_interval = probe_interval
        self._health_timeout = health_timeout
        self._pool = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=max_size,
            open=False,
            timeout=acquire_timeout,
            # Keep trying for as long as the service lives; our watcher decides readiness.
            reconnect_timeout=24 * 3600.0,
            # Autocommit: a single statement is one round trip (no BEGIN/COMMIT around
            # it); `connection()` opens a transaction where several statements need one.
            # psycopg still prepares a statement after its fifth use on a connection.
            kwargs={"connect_timeout": 2, "autocommit": True},
            name="microapp",
        )
        self._ready = asyncio.Event()
        self._failed = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        self._coalesce = coalesce or CoalesceSettings()
        self._writers: dict[str, CoalescingWriter] = {}
        # /healthz asks on one connection of its own, kept open between probes; probes
        # arriving while one is in flight share its answer instead of piling up.
        self._probe_conn: AsyncConnection | None = None
        self._probe: asyncio.Task[bool] | None = None
        self.unrecorded_writes = 0

    @property
    def ready(self) -> bool:
        """True while the database answers and its migrations are applied."""
        return self._ready.is_set()

    async def wait_ready(self) -> None:
        """Return once the database is usable."""
        await self._ready.wait()

    async def start(self) -> None:
        """Open the pool and start watching; never fails because the database is down."""
        await self._pool.open(wait=False)
        self._report_pool_usage()
        self._report_writes()
        self._watcher = asyncio.create_task(self._watch(), name="database-watcher")

    async def close(self) -> None:
        """Finish the writes in flight, stop watching and close every connection."""
        for writer in self._writers.values():
            await writer.close()
        for task in (self._watcher, self._probe):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._probe_conn is not None:
            await self._probe_conn.close()
        await self._pool.close()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncGenerator[AsyncConnection, None]:
        """A pooled connection in a transaction committed on exit.

        Raises `DatabaseUnavailable` at once while the database is known to be down,
        and marks it down when the connection is lost; a query error is raised as is.
        """
        async with self._autocommit_connection() as conn, conn.transaction():
            yield conn

    @contextlib.asynccontextmanager
    async def _autocommit_connection(self) -> AsyncGenerator[AsyncConnection, None]:
        if not self._ready.is_set():
            raise DatabaseUnavailable("database is not available")
        try:
            async with self._pool.connection() as conn:
                try:
                    yield conn
                except psycopg.Error as exc:
                    # Judged here, before the pool takes the connection back and
                    # closes it if it is broken.
                    if connection_lost(exc, conn):
                        self._mark_failed(exc)
                        raise DatabaseUnavailable(str(exc)) from exc
                    raise
        except PoolTimeout as exc:
            # Every connection is busy: the service is overloaded, the database is not
            # down. Refuse this write, but do not refuse the next ones.
            raise DatabaseUnavailable(f"no database connection free: {exc}") from exc
        except psycopg.Error as exc:
            if not connection_lost(exc):
                raise
            self._mark_failed(exc)
            raise DatabaseUnavailable(str(exc)) from exc

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        """Run one statement in one round trip (autocommit).

        Raises `DatabaseUnavailable` when the database is away, or the statement's own
        `psycopg.Error` (which leaves the database usable).
        """
        async with self._autocommit_connection() as conn:
            await conn.execute(trusted_sql(sql), params)

    async def record(self, insert_sql: str, row: Sequence[Any]) -> None:
        """A synchronous record-keeping write: returns once the row is committed.

        With coalescing on, concurrent records of the same statement are committed
        together as one multi-row INSERT. A write that could not be recorded is counted
        (`microapp.db.unrecorded_writes`) and its error raised to the caller, who logs it.
        """
        try:
            if self._coalesce.enabled:
                await self._writer(insert_sql).write(row)
            else:
                await self.execute(insert_sql, row)
        except (DatabaseUnavailable, psycopg.Error):
            self.unrecorded_writes += 1
            raise

    def _writer(self, insert_sql: str) -> CoalescingWriter:
        writer = self._writers.get(insert_sql)
        if writer is None:
            writer = CoalescingWriter(
                self,
                insert_sql,
                max_batch=self._coalesce.max_batch,
                outage_errors=(DatabaseUnavailable,),
            )
            self._writers[insert_sql] = writer
        return writer

    @property
    def coalesced_flushes(self) -> int:
        """Commits made by the coalescing writers."""
        return sum(w.flushes for w in self._writers.values())

    @property
    def coalesced_rows(self) -> int:
        """Rows committed by the coalescing writers."""
        return sum(w.rows for w in self._writers.values())

    @property
    def largest_coalesced_batch(self) -> int:
        """The most rows one coalesced commit held."""
        return max((w.largest_batch for w in self._writers.values()), default=0)

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run one statement for many rows in a single transaction."""
        async with self.connection() as conn, conn.cursor() as cur:
            await cur.executemany(trusted_sql(sql), rows)

    async def healthy(self) -> bool:
        """`SELECT 1` within the health timeout, on a ready database.

        Asked on a connection of its own rather than the pool's, so that a busy pool
        under load does not read as a database that is down. A probe slower than the
        timeout answers False for itself only: it does not mark the database down.
        """
        if not self._ready.is_set():
            return False
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self._probe_once(), name="database-probe")
        try:
            async with asyncio.timeout(self._health_timeout):
                # Shielded: one slow caller timing out leaves the shared probe running.
                return await asyncio.shield(self._probe)
        except TimeoutError:
            return False

    async def _probe_once(self) -> bool:
        try:
            async with asyncio.timeout(_PROBE_GIVE_UP_S):
                return await self._ask_select_1()
        except TimeoutError:
            await self._drop_probe_connection()
            return False
        except Exception:
            # A bug here must answer 503, not break /healthz.
            logger.exception("database probe failed")
            await self._drop_probe_connection()
            return False

    async def _ask_select_1(self) -> bool:
        # A kept connection the server closed while idle says nothing about the server
        # now: ask once more on a fresh one before calling the database down.
        retry_fresh = self._probe_conn is not None
        while True:
            conn = self._probe_conn
            try:
                if conn is None or conn.closed or conn.broken:
                    conn = self._probe_conn = await AsyncConnection.connect(
                        self._url, autocommit=True, connect_timeout=2
                    )
                await conn.execute("SELECT 1")
                return True
            except psycopg.Error as exc:
                if not connection_lost(exc, conn):
                    return False
                await self._drop_probe_connection()
                if retry_fresh:
                    retry_fresh = False
                    continue
                self._mark_failed(exc)
                return False

    async def _drop_probe_connection(self) -> None:
        conn, self._probe_conn = self._probe_conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                await conn.close()

    def _report_pool_usage(self) -> None:
        def stat(key: str) -> Callable[[], float]:
            return lambda: self._pool.get_stats().get(key, 0)

        observe("microapp.db.pool.size", stat("pool_size"), description="open connections")
        observe(
            "microapp.db.pool.available", stat("pool_available"), description="idle connections"
        )
        observe("microapp.db.pool.waiting", stat("requests_waiting"), description="callers waiting")
        observe("microapp.db.ready", lambda: int(self.ready), description="1 when usable")

    def _report_writes(self) -> None:
        observe(
            "microapp.db.unrecorded_writes",
            lambda: self.unrecorded_writes,
            kind="counter",
            description="synchronous writes that could not be recorded",
        )
        observe(
            "microapp.db.coalesce.flushes",
            lambda: self.coalesced_flushes,
            kind="counter",
            description="commits of coalesced synchronous writes",
        )
        observe(
            "microapp.db.coalesce.rows",
            lambda: self.coalesced_rows,
            kind="counter",
            description="rows committed by coalesced flushes",
        )
        observe(
            "microapp.db.coalesce.max_batch",
            lambda: self.largest_coalesced_batch,
            description="the most rows one coalesced commit held",
        )

    def _mark_failed(self, exc: BaseException) -> None:
        if self._ready.is_set():
            logger.warning("database unavailable", extra={"error": str(exc) or type(exc).__name__})
        self._ready.clear()
        self._failed.set()

    async def _watch(self) -> None:
        while True:
            if await self._try_connect_and_migrate():
                # Connections opened before the outage are dead: drop them now rather
                # than fail the first writes after it.
                await self._pool.check()
                self._failed.clear()
                self._ready.set()
                logger.info("database ready")
                await self._failed.wait()
            else:
                await asyncio.sleep(self._probe_interval)

    async def _try_connect_and_migrate(self) -> bool:
        try:
            conn = await AsyncConnection.connect(self._url, connect_timeout=2)
        except psycopg.Error as exc:
            logger.debug("database not reachable", extra={"error": str(exc)})
            return False
        try:
            async with conn:
                await apply_migrations(conn, self._migrations)
        except psycopg.Error as exc:
            logger.warning("migrations failed", extra={"error": str(exc)})
            return False
        return True


async def migrate(url: str, migrations: Sequence[Migration]) -> list[int]:
    """Apply migrations once, for `microapp migrate`; raises when the database is down."""
    async with await AsyncConnection.connect(url, connect_timeout=5) as conn:
        return await apply_migrations(conn, list(migrations))
