"""What production throws at the system, under load: a database outage, a downstream
outage, a shutdown with requests in flight, a burst beyond the write queue.

Real `microapp serve` processes, a real PostgreSQL (the test's own where it is stopped),
real load from concurrent clients. No sleeps and no timing assertions: each phase ends on
an awaited condition (answers counted, a health status, the breaker's logged transitions).
The one bound kept is the documented shutdown deadline (in-flight work finished within 10 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psycopg
import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from microapp.devdb import EmbeddedPostgres
from microapp.gen.caller.v1.caller_connect import CallerServiceClient
from microapp.gen.caller.v1.caller_pb2 import CallExternalRequest
from microapp.gen.gateway.v1.gateway_connect import GatewayServiceClient
from microapp.gen.gateway.v1.gateway_pb2 import InvokeCustomRequest
from microapp.gen.greeter.v1.greeter_connect import GreeterServiceClient
from microapp.gen.greeter.v1.greeter_pb2 import GreetRequest
from tests.support.external import ExternalServer
from tests.support.otlp import OtlpReceiver
from tests.support.polling import eventually
from tests.support.ports import free_port
from tests.support.postgres import TestPostgres, query
from tests.support.services import ServiceProcess

# Calls each load must have answered while the database is down: the outage lasts until
# then, so it spans many writes that cannot be stored, whatever the machine's speed.
OUTAGE_CALLS = 30


# ---------------------------------------------------------------------------- load


@dataclass
class Load:
    """Concurrent workers calling `call(name)` with unique names until stopped.

    Records every name sent, every name answered, and every error, so the test can hold
    the stored rows against what clients saw.
    """

    call: Callable[[str], Awaitable[object]]
    prefix: str
    workers: int = 4
    sent: list[str] = field(default_factory=list)
    answered: list[str] = field(default_factory=list)
    errors: list[tuple[str, BaseException]] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _counter: Iterator[int] = field(default_factory=itertools.count)

    async def _worker(self) -> None:
        while not self._stop.is_set():
            name = f"{self.prefix}-{next(self._counter)}"
            self.sent.append(name)
            try:
                await self.call(name)
            except Exception as exc:
                self.errors.append((name, exc))
            else:
                self.answered.append(name)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(self.workers)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def answers_beyond(self, count: int, extra: int = 1) -> None:
        """Wait until `extra` more calls have been answered than `count`."""
        await eventually(lambda: len(self.answered) >= count + extra, timeout=30)


def _number(name: str) -> int:
    """The sequence number in a Load name: calls are numbered in the order they are sent."""
    return int(name.rsplit("-", 1)[1])


async def _status(url: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status


# ---------------------------------------------------------------------------- database outage


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL of this test's own, so stopping it disturbs no other test."""
    pg = EmbeddedPostgres(tmp_path / "pg", delete_on_close=True)
    pg.start()
    pg.create_databases(["greeter_db", "caller_db", "gateway_db", "lang_db"])
    yield pg
    pg.close()


@dataclass
class System:
    greeter: ServiceProcess
    caller: ServiceProcess
    gateway: ServiceProcess
    lang: ServiceProcess


@pytest.fixture
async def system(own_postgres: EmbeddedPostgres, external: ExternalServer) -> AsyncIterator[System]:
    pg = own_postgres
    caller = ServiceProcess("caller", {"DATABASE_URL": pg.url("caller_db")})
    lang = ServiceProcess("custom-lang", {"DATABASE_URL": pg.url("lang_db")})
    async with caller, lang:
        greeter = ServiceProcess(
            "greeter",
            {
                "DATABASE_URL": pg.url("greeter_db"),
                "CALLER_BASE_URL": caller.url,
                "EXTERNAL_API_URL": external.url(size=7),
            },
        )
        gateway = ServiceProcess(
            "gateway",
            {"DATABASE_URL": pg.url("gateway_db"), "CUSTOM_LANG_BASE_URL": lang.url},
        )
        async with greeter, gateway:
            for service in (greeter, caller, gateway, lang):
                await service.wait_for("/healthz", 200)
            yield System(greeter, caller, gateway, lang)


async def test_database_outage_under_load_loses_no_answer_and_corrupts_no_row(
    system: System, own_postgres: EmbeddedPostgres
) -> None:
    pg = own_postgres
    async with (
        GreeterServiceClient(system.greeter.url) as greeter_client,
        GatewayServiceClient(system.gateway.url) as gateway_client,
    ):

        async def greet(name: str) -> None:
            response = await greeter_client.greet(GreetRequest(name=name))
            assert response.message == f"Hello {name} from greeter-service!"

        async def invoke(name: str) -> None:
            response = await gateway_client.invoke_custom(InvokeCustomRequest(name=name))
            assert response.message == f"Hello {name} from custom-lang-service!"

        greets, invokes = Load(greet, "g"), Load(invoke, "i")
        greets.start()
        invokes.start()
        try:
            await greets.answers_beyond(0, 20)
            await invokes.answers_beyond(0, 20)

            await asyncio.to_thread(pg.stop)
            await system.greeter.wait_for("/healthz", 503)
            await system.gateway.wait_for("/healthz", 503)
            down_greets, down_invokes = len(greets.answered), len(invokes.answered)
            # The services keep answering all along the outage.
            await greets.answers_beyond(down_greets, OUTAGE_CALLS)
            await invokes.answers_beyond(down_invokes, OUTAGE_CALLS)
            # Still down at its end, and still alive.
            assert await _status(system.greeter.url + "/healthz") == 503
            assert await _status(system.gateway.url + "/healthz") == 503
            assert await _status(system.greeter.url + "/livez") == 200

            await asyncio.to_thread(pg.start)
            for service in (system.greeter, system.caller, system.gateway, system.lang):
                await service.wait_for("/healthz", 200)
            recovered_greets, recovered_invokes = len(greets.sent), len(invokes.sent)
            await greets.answers_beyond(recovered_greets, 20)
            await invokes.answers_beyond(recovered_invokes, 20)
        finally:
            await greets.stop()
            await invokes.stop()

    # Every call was answered, during the outage too.
    assert greets.errors == [] and invokes.errors == []

    greetings = query(pg.url("greeter_db"), "SELECT name, message, external_status FROM greetings")
    invocations = query(
        pg.url("gateway_db"), "SELECT name, result_message, success FROM invocations"
    )
    executions = query(
        pg.url("lang_db"), "SELECT name, result_message, status_code FROM executions"
    )
    for rows, sent in (
        (greetings, greets.sent),
        (invocations, invokes.sent),
        (executions, invokes.sent),
    ):
        names = [row[0] for row in rows]
        assert len(names) == len(set(names)), "a row was stored twice"
        assert set(names) <= set(sent), "a row nobody asked for"
    # No row is corrupted: each holds exactly what its request produced.
    assert all(r[1:] == (f"Hello {r[0]} from greeter-service!", 200) for r in greetings)
    assert all(r[1:] == (f"Hello {r[0]} from custom-lang-service!", True) for r in invocations)
    assert all(r[1:] == (f"Hello {r[0]} from custom-lang-service!", 200) for r in executions)
    # Writes resumed by themselves: every call made after /healthz said 200 is stored.
    stored_greets = {r[0] for r in greetings}
    stored_invokes = {r[0] for r in invocations}
    assert {n for n in greets.answered if _number(n) >= recovered_greets} - stored_greets == set()
    assert {
        n for n in invokes.answered if _number(n) >= recovered_invokes
    } - stored_invokes == set()
    # Some calls during the outage were answered without their row: the outage was real.
    assert len(stored_greets) < len(greets.answered)
    # The caller's call log waited in its queue instead of being lost: one row per greeting.
    await eventually(
        lambda: (
            query(pg.url("caller_db"), "SELECT count(*) FROM call_logs")[0][0]
            == len(greets.answered)
        ),
        timeout=30,
    )


# ---------------------------------------------------------------------------- downstream outage

OPEN_S = 6.0  # GATEWAY_BREAKER_OPEN_S: long enough to restart custom-lang inside it
ATTEMPT_TIMEOUT_S = 1.0  # the gateway's per-attempt timeout: the longest one call takes


async def _breaker(gateway: ServiceProcess) -> dict[str, object]:
    async with aiohttp.ClientSession() as session, session.get(gateway.url + "/debug/breaker") as r:
        return await r.json()


async def _breaker_is(gateway: ServiceProcess, state: str) -> bool:
    return (await _breaker(gateway))["state"] == state


def _breaker_changes(logs: str) -> list[str]:
    """The states the breaker entered, in order, from the gateway's JSON log."""
    changes = []
    for line in logs.splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and "to_state" in record:
                changes.append(str(record["to_state"]))
    return changes


def _not_called(load: Load) -> int:
    """Calls the open breaker refused without sending them to custom-lang."""
    return sum(
        1
        for _, exc in load.errors
        if isinstance(exc, ConnectError)
        and exc.code == Code.UNAVAILABLE
        and "custom-lang not called" in str(exc)
    )


async def test_downstream_outage_opens_the_breaker_and_a_restart_closes_it(
    postgres: TestPostgres,
) -> None:
    lang_db = postgres.fresh_database("res_lang")
    lang = ServiceProcess("custom-lang", {"DATABASE_URL": lang_db})
    await lang.start()
    gateway = ServiceProcess(
        "gateway",
        {
            "CUSTOM_LANG_BASE_URL": lang.url,
            "GATEWAY_BREAKER_OPEN_S": str(OPEN_S),
            "GATEWAY_ATTEMPT_TIMEOUT_S": str(ATTEMPT_TIMEOUT_S),
        },
    )
    restarted = ServiceProcess("custom-lang", {"DATABASE_URL": lang_db})
    restarted.port, restarted.url = lang.port, lang.url  # the same address as before

    def executions() -> int:
        return query(lang_db, "SELECT count(*) FROM executions")[0][0]

    async with gateway, GatewayServiceClient(gateway.url) as client:

        async def invoke(name: str) -> None:
            await client.invoke_custom(InvokeCustomRequest(name=name))

        load = Load(invoke, "d", workers=4)
        load.start()
        try:
            await load.answers_beyond(0, 20)
            assert await _breaker_is(gateway, "closed")

            assert lang.process is not None
            lang.process.kill()  # a crash, not a graceful stop
            await lang.process.wait()
            await eventually(lambda: _breaker_is(gateway, "open"))
            # Open: calls fail fast with unavailable, without being sent downstream.
            await eventually(lambda: _not_called(load) >= 10)

            await restarted.start()
            await restarted.wait_for("/healthz", 200)
            assert await _breaker_is(gateway, "open"), "restart took longer than the open period"
            before, refused = executions(), _not_called(load)
            await eventually(lambda: _not_called(load) >= refused + 5)
            if await _breaker_is(gateway, "open"):
                # custom-lang is up again, yet the open breaker sent it nothing.
                assert executions() == before

            # Half-open after the open period; the trial calls succeed and close it.
            await eventually(lambda: _breaker_is(gateway, "closed"), timeout=60)
            # The crash opened it once; its first half-open trials closed it, not reopened it.
            assert _breaker_changes(gateway.logs())[-3:] == ["open", "half_open", "closed"]
            assert _breaker_changes(gateway.logs()).count("open") == 1
            answered = len(load.answered)
            await load.answers_beyond(answered, 20)
        finally:
            await load.stop()
            await restarted.stop()
            await lang.stop()
    assert executions() > before


# ---------------------------------------------------------------------------- graceful shutdown


async def test_sigterm_under_load_keeps_a_call_log_row_for_every_answer_and_exits_zero(
    postgres: TestPostgres, external: ExternalServer
) -> None:
    db = postgres.fresh_database("res_shutdown")
    caller = ServiceProcess("caller", {"DATABASE_URL": db})
    await caller.start()
    urls: dict[str, str] = {}
    try:
        await caller.wait_for("/healthz", 200)
        async with CallerServiceClient(caller.url) as client:

            async def call(name: str) -> None:
                # A distinct URL per call (its size), answered after a short delay so
                # that calls are in flight when the signal arrives.
                url = external.url(size=int(name.split("-")[1]), delay=0.2)
                urls[name] = url
                response = await client.call_external(CallExternalRequest(url=url))
                assert response.status_code == 200

            load = Load(call, "s", workers=16)
            load.start()
            try:
                await load.answers_beyond(0, 40)
                assert caller.process is not None
                answered_at_signal = len(load.answered)
                caller.process.send_signal(signal.SIGTERM)
                async with asyncio.timeout(10):  # exits within 10 s
                    code = await caller.process.wait()
            finally:
                await load.stop()
    finally:
        await caller.stop()

    assert code == 0, caller.logs()[-3000:]
    # Calls in flight when the signal came were finished, not dropped.
    assert len(load.answered) > answered_at_signal
    logged = {row[0] for row in query(db, "SELECT url FROM call_logs")}
    assert {urls[name] for name in load.answered} - logged == set()


# ---------------------------------------------------------------------------- write queue burst


CAPACITY = 5
BURST = 60


def _drop_log_lines(logs: str) -> list[dict[str, object]]:
    lines = []
    for line in logs.splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if record.get("message") == "write queue full, row dropped":
                lines.append(record)
    return lines


async def test_burst_beyond_the_write_queue_drops_and_counts_rows_and_answers_at_once(
    postgres: TestPostgres, external: ExternalServer
) -> None:
    db = postgres.fresh_database("res_burst")
    receiver = OtlpReceiver()
    await receiver.start()
    try:
        env = {
            "DATABASE_URL": db,
            "CALLER_WRITE_QUEUE_CAPACITY": str(CAPACITY),
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_METRIC_EXPORT_INTERVAL": "200",
        }
        async with ServiceProcess("caller", env) as caller:
            await caller.wait_for("/healthz", 200)
            async with await psycopg.AsyncConnection.connect(db) as blocker:
                # Hold the table: the writer is stuck on its first batch, so the queue
                # fills up and stays full for the whole burst.
                await blocker.execute("LOCK TABLE call_logs IN ACCESS EXCLUSIVE MODE")
                async with CallerServiceClient(caller.url) as client:
                    responses = await asyncio.gather(
                        *(
                            client.call_external(CallExternalRequest(url=external.url(size=i)))
                            for i in range(BURST)
                        )
                    )
                # Every answer came back while no row could be written.
                assert [r.body_length for r in responses] == list(range(BURST))
                drops = await eventually(lambda: _drop_log_lines(caller.logs()))
                assert drops[0]["dropped"] == 1
                await eventually(
                    lambda: receiver.metric_values.get("microapp.write_queue.dropped", 0)
                )
                await blocker.rollback()  # release the table

            def written() -> int:
                return query(db, "SELECT count(*) FROM call_logs")[0][0]

            dropped = await eventually(
                lambda: (
                    written() + receiver.metric_values.get("microapp.write_queue.dropped", 0)
                    == BURST
                    and receiver.metric_values["microapp.write_queue.dropped"]
                )
            )
    finally:
        await receiver.close()
    # Kept: the batch the writer held (at most a queue's worth) and a full queue behind
    # it. Everything else was dropped, and counted.
    assert CAPACITY < BURST - dropped <= 2 * CAPACITY


# ---------------------------------------------------------------------------- early answers on h2c


async def _h2_response(
    reader: asyncio.StreamReader, conn: object, stream_id: int
) -> tuple[int, bool]:
    """Read until `stream_id` has its response headers and end; (status, connection alive)."""
    import h2.events

    status = 0
    while True:
        data = await reader.read(65536)
        if not data:
            return status, False
        for event in conn.receive_data(data):  # type: ignore[attr-defined]
            if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream_id:
                status = int(dict(event.headers)[b":status"])
            if isinstance(event, h2.events.StreamEnded) and event.stream_id == stream_id:
                return status, True
            if isinstance(event, h2.events.ConnectionTerminated):
                return status, False


async def test_a_request_answered_before_its_body_arrives_leaves_the_h2c_connection_usable() -> (
    None
):
    # Servers answer some requests before reading their body (a wrong content type, an
    # oversized body). Body frames that arrive after that answer must not tear down the
    # connection: under h2c it carries other callers' requests too (a proxy, a service).
    import h2.config
    import h2.connection
    from hyperframe.frame import DataFrame

    async with ServiceProcess("custom-lang") as lang:
        reader, writer = await asyncio.open_connection("127.0.0.1", lang.port)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        request = [(":method", "POST"), (":scheme", "http"), (":authority", "localhost"),
                   (":path", "/customlang.v1.CustomLangService/Invoke"),
                   ("content-type", "text/plain")]  # fmt: skip
        conn.send_headers(1, request)
        writer.write(conn.data_to_send())
        status, alive = await _h2_response(reader, conn, 1)
        assert (status, alive) == (415, True)

        # Written as a raw frame: the server may already have asked us to stop sending with
        # RST_STREAM(NO_ERROR), and this is the frame a client had in flight before that.
        late = DataFrame(1, data=b"the body, after the answer", flags=["END_STREAM"])
        writer.write(late.serialize())
        conn.send_headers(
            3,
            [
                (":method", "GET"),
                (":scheme", "http"),
                (":authority", "localhost"),
                (":path", "/livez"),
            ],
            end_stream=True,
        )
        writer.write(conn.data_to_send())
        status, alive = await _h2_response(reader, conn, 3)
        writer.close()
        assert (status, alive) == (200, True), lang.logs()[-2000:]


# ---------------------------------------------------------------------------- opt-in server


async def test_granian_server_option_serves_connect_and_drains_the_call_log_on_sigterm(
    postgres: TestPostgres, external: ExternalServer
) -> None:
    db = postgres.fresh_database("res_granian")
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "microapp", "serve", "caller", "--server", "granian",
        "--host", "127.0.0.1", "--port", str(port),
        # Its external target is on loopback, which caller refuses unless told.
        env={**os.environ, "DATABASE_URL": db, "CALLER_ALLOW_PRIVATE_NETWORKS": "1"},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        await eventually(lambda: _answers(url + "/healthz", 200), timeout=30)
        async with CallerServiceClient(url) as client:
            responses = await asyncio.gather(
                *(
                    client.call_external(CallExternalRequest(url=external.url(size=i)))
                    for i in range(20)
                )
            )
        assert [r.body_length for r in responses] == list(range(20))
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    rows = query(db, "SELECT body_length FROM call_logs ORDER BY body_length")
    assert [r[0] for r in rows] == list(range(20))


async def _answers(url: str, status: int) -> bool:
    try:
        return await _status(url) == status
    except aiohttp.ClientError:
        return False
