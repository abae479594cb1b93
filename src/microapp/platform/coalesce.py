"""Coalesced commits for synchronous record-keeping writes.

Concurrent writes of the same `INSERT ... VALUES (...)` statement are committed together
as one multi-row INSERT: while one flush is in flight, the next arrivals queue, and the
next flush takes them all (up to `max_batch`). An idle service therefore adds no delay (a
lone write is flushed at once) and a busy one commits in batches. Every caller is
answered only after its own row is committed, so "the row exists before the response"
still holds. A batch the database refuses is retried row by row, so only the bad row's
caller sees the failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol

# Defined with the other settings models; imported from here too.
from microapp.platform.config import CoalesceSettings as CoalesceSettings

logger = logging.getLogger(__name__)

Row = Sequence[Any]

# `INSERT INTO t (a, b) VALUES (%s, %s)`: everything up to the row, then the row itself.
_VALUES = re.compile(r"^(?P<head>.*\bVALUES\s*)(?P<row>\([^()]*\))\s*;?\s*$", re.I | re.S)


class StatementRunner(Protocol):
    """What the writer needs from the database: one statement, committed on return."""

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None: ...


class MultiRowInsert:
    """Builds the N-row form of a single-row `INSERT ... VALUES (...)` statement."""

    def __init__(self, insert_sql: str) -> None:
        match = _VALUES.match(insert_sql.strip())
        if match is None:
            raise ValueError(f"not a single-row INSERT ... VALUES (...) statement: {insert_sql!r}")
        self.single = insert_sql
        self._head = match["head"]
        self._row = match["row"]
        self._cache: dict[int, str] = {1: insert_sql}

    def sql(self, rows: int) -> str:
        """The statement inserting `rows` rows; the same text for the same count, so it
        is prepared once per connection like any other repeated statement."""
        statement = self._cache.get(rows)
        if statement is None:
            statement = self._head + ", ".join([self._row] * rows)
            self._cache[rows] = statement
        return statement


class CoalescingWriter:
    """Commits concurrent writes of one statement together, one flush at a time."""

    def __init__(
        self,
        runner: StatementRunner,
        insert_sql: str,
        *,
        max_batch: int = 100,
        outage_errors: tuple[type[BaseException], ...] = (),
    ) -> None:
        self._runner = runner
        self._insert = MultiRowInsert(insert_sql)
        self._max_batch = max_batch
        # Errors meaning "the database is away", not "this row is bad": a batch failing
        # with one of them fails as a whole, as a single write would, without a retry.
        self._outage_errors = outage_errors
        self._pending: deque[tuple[Row, asyncio.Future[None]]] = deque()
        self._flusher: asyncio.Task[None] | None = None
        self.flushes = 0
        self.rows = 0
        self.largest_batch = 0

    async def write(self, row: Row) -> None:
        """Return once `row` is committed; raise the database's error when it is not."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((row, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_pending(), name="coalesced-flush")
        # A caller that goes away (cancelled request) cancels only its own future: the
        # flush, and the rows sharing its batch, carry on.
        await future

    async def close(self) -> None:
        """Wait for the rows already handed over to be flushed."""
        if self._flusher is not None:
            with contextlib.suppress(Exception):
                await self._flusher

    async def _flush_pending(self) -> None:
        while self._pending:
            count = min(self._max_batch, len(self._pending))
            batch = [self._pending.popleft() for _ in range(count)]
            try:
                await self._flush(batch)
            except BaseException as exc:
                # Only a cancellation gets here (_flush handles every error): never leave
                # a caller waiting forever on a flusher that is gone.
                for _, future in [*batch, *self._pending]:
                    _settle(future, exc)
                self._pending.clear()
                raise

    async def _flush(self, batch: list[tuple[Row, asyncio.Future[None]]]) -> None:
        rows = [row for row, _ in batch]
        try:
            await self._runner.execute(
                self._insert.sql(len(rows)), list(itertools.chain.from_iterable(rows))
            )
        except self._outage_errors as exc:
            for _, future in batch:
                _settle(future, exc)
            return
        except Exception as exc:
            if len(batch) == 1:
                _settle(batch[0][1], exc)
                return
            logger.warning(
                "coalesced batch refused, retrying row by row",
                extra={"rows": len(batch), "error": str(exc)},
            )
            await self._flush_one_by_one(batch)
            return
        self._count(len(batch))
        for _, future in batch:
            _settle(future, None)

    async def _flush_one_by_one(self, batch: list[tuple[Row, asyncio.Future[None]]]) -> None:
        for index, (row, future) in enumerate(batch):
            try:
                await self._runner.execute(self._insert.single, row)
            except self._outage_errors as exc:
                for _, rest in batch[index:]:
                    _settle(rest, exc)
                return
            except Exception as exc:
                _settle(future, exc)
                continue
            self._count(1)
            _settle(future, None)

    def _count(self, rows: int) -> None:
        self.flushes += 1
        self.rows += rows
        self.largest_batch = max(self.largest_batch, rows)


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    elif isinstance(error, asyncio.CancelledError):
        future.cancel()
    else:
        future.set_exception(error)
