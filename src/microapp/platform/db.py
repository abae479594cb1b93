"""A PostgreSQL pool that survives the database being down at startup or later.

The service keeps serving while the database is away: writes are refused at once
(`DatabaseUnavailable`) instead of waiting on a dead server, `/healthz` says 503, and a
watcher reconnects and applies migrations as soon as the database answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from microapp.platform.migrations import Migration, apply_migrations
from microapp.platform.telemetry import observe

logger = logging.getLogger(__name__)


class DatabaseUnavailable(Exception):
    """The database is configured but cannot be used right now."""


class Database:
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
            kwargs={"connect_timeout": 2},
            name="microapp",
        )
        self._ready = asyncio.Event()
        self._failed = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None

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
        self._watcher = asyncio.create_task(self._watch(), name="database-watcher")

    async def close(self) -> None:
        """Stop watching and close every connection."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await self._pool.close()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection]:
        """A pooled connection in a transaction committed on exit.

        Raises `DatabaseUnavailable` at once while the database is known to be down,
        and marks it down when the connection fails.
        """
        if not self._ready.is_set():
            raise DatabaseUnavailable("database is not available")
        try:
            async with self._pool.connection() as conn:
                yield conn
        except PoolTimeout as exc:
            # Every connection is busy: the service is overloaded, the database is not
            # down. Refuse this write, but do not refuse the next ones.
            raise DatabaseUnavailable(f"no database connection free: {exc}") from exc
        except psycopg.OperationalError as exc:
            self._mark_failed(exc)
            raise DatabaseUnavailable(str(exc)) from exc

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        """Run one statement; raises `DatabaseUnavailable` or `psycopg.Error`."""
        async with self.connection() as conn:
            await conn.execute(sql, params)

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run one statement for many rows in a single transaction."""
        async with self.connection() as conn, conn.cursor() as cur:
            await cur.executemany(sql, rows)

    async def healthy(self) -> bool:
        """`SELECT 1` within the health timeout, on a ready database.

        Asked on its own connection rather than the pool's, so that a busy pool under
        load does not read as a database that is down.
        """
        if not self._ready.is_set():
            return False
        try:
            async with (
                asyncio.timeout(self._health_timeout),
                await AsyncConnection.connect(self._url, autocommit=True) as conn,
            ):
                await conn.execute("SELECT 1")
        except (TimeoutError, psycopg.Error) as exc:
            self._mark_failed(exc)
            return False
        return True

    def _report_pool_usage(self) -> None:
        def stat(key: str) -> Callable[[], float]:
            return lambda: self._pool.get_stats().get(key, 0)

        observe("microapp.db.pool.size", stat("pool_size"), description="open connections")
        observe(
            "microapp.db.pool.available", stat("pool_available"), description="idle connections"
        )
        observe("microapp.db.pool.waiting", stat("requests_waiting"), description="callers waiting")
        observe("microapp.db.ready", lambda: int(self.ready), description="1 when usable")

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
