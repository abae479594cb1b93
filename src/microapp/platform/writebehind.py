"""A bounded write-behind queue: rows are written after the response, off the request path.

A full queue drops the row and counts it instead of making a response wait. While the
database is down, queued rows wait for it rather than being lost. A graceful shutdown
drains what is queued, so only a crash can lose rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import psycopg

from microapp.platform.db import Database, DatabaseUnavailable
from microapp.platform.telemetry import observe

logger = logging.getLogger(__name__)

Row = tuple[Any, ...]


class WriteBehindQueue:
    """Queues rows for one INSERT statement and writes them in batches."""

    def __init__(
        self,
        database: Database,
        insert_sql: str,
        *,
        capacity: int = 10_000,
        batch_size: int = 100,
        drain_timeout: float = 10.0,
    ) -> None:
        self._database = database
        self._insert_sql = insert_sql
        self._queue: asyncio.Queue[Row] = asyncio.Queue(maxsize=capacity)
        self._batch_size = batch_size
        self._drain_timeout = drain_timeout
        self._worker: asyncio.Task[None] | None = None
        self._in_flight = 0
        self.dropped = 0
        self.written = 0

    @property
    def depth(self) -> int:
        """Rows not yet written: queued, plus the batch being written."""
        return self._queue.qsize() + self._in_flight

    def offer(self, row: Row) -> bool:
        """Queue a row without waiting; False (and counted) when the queue is full."""
        try:
            self._queue.put_nowait(row)
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                logger.warning("write queue full, row dropped", extra={"dropped": self.dropped})
            return False
        return True

    async def start(self) -> None:
        """Start the background writer."""
        observe(
            "microapp.write_queue.depth", lambda: self.depth, description="rows not yet written"
        )
        observe(
            "microapp.write_queue.dropped",
            lambda: self.dropped,
            kind="counter",
            description="rows dropped because the queue was full",
        )
        self._worker = asyncio.create_task(self._run(), name="write-behind")

    async def close(self) -> None:
        """Write what is queued (up to the drain timeout), then stop the writer."""
        if self._worker is None:
            return
        pending = self.depth
        if pending:
            logger.info("draining write queue", extra={"rows": pending})
        try:
            async with asyncio.timeout(self._drain_timeout):
                await self._queue.join()
        except TimeoutError:
            logger.error(
                "write queue not drained before timeout; rows lost",
                extra={"rows": self.depth},
            )
        self._worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._worker

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            self._in_flight = len(batch)
            await self._write(batch)
            self._in_flight = 0
            for _ in batch:
                self._queue.task_done()

    async def _write(self, batch: Sequence[Row]) -> None:
        # Keep the batch until it is written: a database outage delays rows, it does
        # not lose them. A row the database refuses (bad data) is logged and skipped.
        while True:
            await self._database.wait_ready()
            try:
                await self._database.executemany(self._insert_sql, batch)
            except DatabaseUnavailable:
                continue
            except psycopg.Error as exc:
                logger.error(
                    "write-behind batch refused", extra={"rows": len(batch), "error": str(exc)}
                )
                return
            self.written += len(batch)
            return
