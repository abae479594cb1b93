"""SIGTERM with call logs still queued: every queued row reaches call_logs, exit code 0."""

from __future__ import annotations

import asyncio

import psycopg

from microapp.gen.caller.v1.caller_connect import CallerServiceClient
from microapp.gen.caller.v1.caller_pb2 import CallExternalRequest
from tests.support.external import ExternalServer
from tests.support.polling import eventually
from tests.support.postgres import TestPostgres, query
from tests.support.services import ServiceProcess

CALLS = 50


async def test_sigterm_drains_every_queued_call_log(
    postgres: TestPostgres, external: ExternalServer
) -> None:
    db = postgres.fresh_database("caller_drain")
    caller = ServiceProcess("caller", {"DATABASE_URL": db})
    await caller.start()
    try:
        await caller.wait_for("/healthz", 200)  # migrated: call_logs exists
        async with await psycopg.AsyncConnection.connect(db) as blocker:
            # Hold the table so that the write-behind worker cannot write: every row
            # of the calls below is still queued (or in flight) when SIGTERM arrives.
            await blocker.execute("LOCK TABLE call_logs IN ACCESS EXCLUSIVE MODE")
            async with CallerServiceClient(caller.url) as client:
                urls = [external.url(size=i) for i in range(CALLS)]
                responses = await asyncio.gather(
                    *(client.call_external(CallExternalRequest(url=u)) for u in urls)
                )
            assert [r.body_length for r in responses] == list(range(CALLS))

            assert caller.process is not None
            caller.process.terminate()
            await eventually(lambda: "draining write queue" in caller.logs())
            assert caller.process.returncode is None  # still draining, waiting on the lock
            await blocker.rollback()  # release the table

        assert await caller.stop() == 0
    finally:
        await caller.stop()

    rows = query(db, "SELECT body_length FROM call_logs ORDER BY body_length")
    assert [r[0] for r in rows] == list(range(CALLS))
