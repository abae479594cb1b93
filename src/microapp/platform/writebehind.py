"""A bounded write-behind queue: rows are written after the response, off the request path.

A full queue drops the row and counts it instead of making a response wait. While the
database is down, queued rows wait for it rather than being lost. A graceful shutdown
drains what is queued, so only a crash can lose rows. A batch the database refuses is
retried row by row, so only the rows it refuses are dropped (and counted); no error stops
the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from microapp.platform.db import Database, DatabaseUnavailable
from microapp.platform.resource import StartedResource
from microapp.platform.telemetry import observe

logger = logging.getLogger(__name__)

Row = tuple[Any, ...]


class WriteBehindQueue(StartedResource):
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
        self.refused = 0
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
        observe(
            "microapp.write_queue.refused",
            lambda: self.refused,
            kind="counter",
            description="rows dropped because the database refused them",
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
            try:
                await self._write(batch)
            except Exception:
                # A bug must not stop the writer: every row queued after it would be
                # silently lost. Count the batch as refused and carry on.
                self.refused += len(batch)
                logger.exception("write-behind batch failed", extra={"rows": len(batch)})
            finally:
                self._in_flight = 0
                for _ in batch:
                    self._queue.task_done()

    async def _write(self, batch: Sequence[Row]) -> None:
        # Keep the batch until it is written: a database outage delays rows, it does
        # not lose them. A batch the database refuses is retried row by row.
        while True:
            await self._database.wait_ready()
            try:
                await self._database.executemany(self._insert_sql, batch)
            except DatabaseUnavailable:
                continue
            except Exception as exc:
                logger.warning(
                    "write-behind batch refused, retrying row by row",
                    extra={"rows": len(batch), "error": str(exc) or type(exc).__name__},
                )
                for row in batch:
                    await self._write_row(row)
                return
            self.written += len(batch)
            return

    async def _write_row(self, row: Row) -> None:
        while True:
            await self._database.wait_ready()
            try:
                await self._database.execute(self._insert_sql, row)
            except DatabaseUnavailable:
                continue
            except Exception as exc:
                # Only this row is lost; the reason is the database's (or the bug's).
                self.refused += 1
                logger.error(
                    "write-behind row refused",
                    extra={"error": str(exc) or type(exc).__name__, "refused": self.refused},
                )
                return
            self.written += 1
            return
