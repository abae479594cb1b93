"""Idempotency-Key: a side-effecting call runs once per key; a repeat gets the stored outcome.

A client sends `Idempotency-Key: <1-255 printable ASCII characters>` with a call it may
retry. The first call with a key claims it (an in-progress row, inserted atomically), runs,
and stores how it ended: the response message or the error. A repeat of the same request
with the same key replays that outcome without running anything; the same key with a
different request is refused; a repeat arriving while the first still runs waits for it
(bounded). Services declare which calls take part (`IdempotentCall` in `ServiceParts`); the
platform applies it to Connect calls (`IdempotencyInterceptor`, every protocol) and REST
routes (`IdempotentRoutes`). Outcomes live in the service's own database
(`idempotency_keys`), or without one in a bounded in-memory store. See docs/idempotency.md.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

import psycopg
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from google.protobuf.message import Message as ProtoMessage
from psycopg.types.json import Jsonb
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from microapp.platform.config import IdempotencySettings
from microapp.platform.db import Database, DatabaseUnavailable

# Defined with the other settings models; imported from here too.
from microapp.platform.resource import StartedResource
from microapp.platform.rest import json_error

logger = logging.getLogger(__name__)

REQ = TypeVar("REQ")
RES = TypeVar("RES")

HEADER = "Idempotency-Key"
# Sent with every replayed answer, so a client (and a test) can tell a replay from a run.
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255
_KEY = re.compile(r"[\x20-\x7e]{1,255}")

DEFAULT_TTL_S = 24 * 3600.0
DEFAULT_WAIT_S = 10.0
DEFAULT_LEASE_S = 30.0
DEFAULT_PRUNE_INTERVAL_S = 300.0
DEFAULT_MEMORY_KEYS = 10_000

# Connect codes that say "try again": the call did not complete, so its key is released
# rather than pinned to an answer a retry is meant to get past.
TRANSIENT_CODES = frozenset(
    {
        Code.CANCELED,
        Code.DEADLINE_EXCEEDED,
        Code.RESOURCE_EXHAUSTED,
        Code.ABORTED,
        Code.INTERNAL,
        Code.UNAVAILABLE,
    }
)
# The same for REST answers: request timeout, too early, too many requests, server errors.
TRANSIENT_STATUSES = frozenset({408, 425, 429})


@dataclass(frozen=True)
class IdempotentCall:
    """A call that honours `Idempotency-Key`.

    `procedure` is a Connect procedure (`/greeter.v1.GreeterService/Greet`) or a REST route
    (`POST /auth/register`). Fields named in `unfingerprinted` are left out of the request
    fingerprint, because the fingerprint is stored: a password must not be kept as a fast hash.
    """

    procedure: str
    unfingerprinted: tuple[str, ...] = ()


# --- keys and fingerprints ---------------------------------------------------------------


class InvalidKey(ValueError):
    """The Idempotency-Key header is present but unusable."""


def parse_key(values: Sequence[str]) -> str | None:
    """The key from the header's values; None when the header is absent.

    Raises `InvalidKey` when it is sent twice, empty, longer than 255 characters, or holds
    anything but printable ASCII (control characters, non-ASCII).
    """
    if not values:
        return None
    if len(values) > 1:
        raise InvalidKey(f"{HEADER} must be sent once, got {len(values)} values")
    key = values[0]
    if not key:
        raise InvalidKey(f"{HEADER} must not be empty")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidKey(f"{HEADER} must be at most {MAX_KEY_LENGTH} characters, got {len(key)}")
    if not _KEY.fullmatch(key):
        raise InvalidKey(f"{HEADER} must hold printable ASCII characters only")
    return key


def fingerprint(procedure: str, canonical_request: bytes) -> bytes:
    """SHA-256 of the procedure and the request in a canonical form: what makes a repeat
    "the same request"."""
    return hashlib.sha256(procedure.encode() + b"\n" + canonical_request).digest()


def canonical_message(message: ProtoMessage, unfingerprinted: Sequence[str] = ()) -> bytes:
    """The request message in deterministic binary form, whatever protocol and codec it
    arrived in (JSON and binary Connect, gRPC, gRPC-Web all give the same bytes)."""
    if unfingerprinted:
        copy = type(message)()
        copy.CopyFrom(message)
        for name in unfingerprinted:
            copy.ClearField(name)
        message = copy
    return message.SerializeToString(deterministic=True)


def canonical_json_body(
    content_type: str | None, body: bytes, unfingerprinted: Sequence[str] = ()
) -> bytes:
    """A REST request as its media type and its JSON with sorted members; a body that is not
    a JSON object is taken as its raw bytes (the route refuses it, and that is replayed)."""
    media_type = (content_type or "").split(";")[0].strip().lower()
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        value = None
    if isinstance(value, dict):
        fields = cast("dict[str, object]", value)  # json.loads: an object's keys are str
        kept = {k: v for k, v in fields.items() if k not in unfingerprinted}
        body = json.dumps(kept, sort_keys=True, separators=(",", ":")).encode()
    return media_type.encode() + b"\n" + body


# --- outcomes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class MessageOutcome:
    """A Connect call that succeeded: its response message, serialized."""

    type_name: str
    data: bytes


@dataclass(frozen=True)
class ErrorOutcome:
    """A Connect call that failed: its code and message (error details are not kept)."""

    code: Code
    message: str


@dataclass(frozen=True)
class HttpOutcome:
    """A REST call's answer: status, content type and body."""

    status: int
    content_type: str
    body: bytes


Outcome = MessageOutcome | ErrorOutcome | HttpOutcome


def is_transient(outcome: Outcome) -> bool:
    """Whether the outcome says "try again" and so is not stored."""
    if isinstance(outcome, ErrorOutcome):
        return outcome.code in TRANSIENT_CODES
    if isinstance(outcome, HttpOutcome):
        return outcome.status in TRANSIENT_STATUSES or outcome.status >= 500
    return False


def outcome_to_json(outcome: Outcome) -> dict[str, Any]:
    """The outcome as the JSON document stored in `idempotency_keys.outcome`."""
    if isinstance(outcome, MessageOutcome):
        data = base64.b64encode(outcome.data).decode()
        return {"kind": "message", "type": outcome.type_name, "data": data}
    if isinstance(outcome, ErrorOutcome):
        return {"kind": "error", "code": outcome.code.value, "message": outcome.message}
    return {
        "kind": "http",
        "status": outcome.status,
        "content_type": outcome.content_type,
        "body": base64.b64encode(outcome.body).decode(),
    }


def outcome_from_json(document: Mapping[str, Any]) -> Outcome:
    """The outcome `outcome_to_json` stored."""
    kind = document["kind"]
    if kind == "message":
        return MessageOutcome(document["type"], base64.b64decode(document["data"]))
    if kind == "error":
        return ErrorOutcome(Code(document["code"]), document["message"])
    if kind == "http":
        body = base64.b64decode(document["body"])
        return HttpOutcome(int(document["status"]), document["content_type"], body)
    raise ValueError(f"unknown stored outcome kind {kind!r}")


# --- stores ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claimed:
    """This call owns the key now; `owner` proves it when finishing or releasing."""

    owner: uuid.UUID


@dataclass(frozen=True)
class Existing:
    """Another call holds the key: its fingerprint, and its outcome once it has finished."""

    fingerprint: bytes
    outcome: Outcome | None


class StoreUnavailable(Exception):
    """The outcomes cannot be read or written right now."""


class IdempotencyStore(Protocol):
    """Where claims and outcomes are kept, per procedure and key."""

    async def claim(
        self, procedure: str, key: str, fingerprint: bytes
    ) -> Claimed | Existing | None:
        """Claim the key when it is new, expired, or abandoned past its lease; else what holds
        it. None when the holder vanished between looking and claiming (ask again)."""
        ...

    async def finish(self, procedure: str, key: str, owner: uuid.UUID, outcome: Outcome) -> None:
        """Store the outcome of the call that claimed the key."""
        ...

    async def release(self, procedure: str, key: str, owner: uuid.UUID) -> None:
        """Give up a claim without an outcome, so the next call with the key runs."""
        ...

    async def prune(self) -> int:
        """Delete expired keys; return how many."""
        ...


_CLAIM = """
INSERT INTO idempotency_keys AS k
    (procedure, key, fingerprint, status, owner, created_at, claimed_at, expires_at)
VALUES (%(procedure)s, %(key)s, %(fingerprint)s, 'in_progress', %(owner)s, now(), now(),
        now() + %(ttl_s)s * interval '1 second')
ON CONFLICT (procedure, key) DO UPDATE
SET fingerprint = EXCLUDED.fingerprint, status = 'in_progress', owner = EXCLUDED.owner,
    outcome = NULL, created_at = EXCLUDED.created_at, claimed_at = EXCLUDED.claimed_at,
    expires_at = EXCLUDED.expires_at
WHERE k.expires_at <= now()
   OR (k.status = 'in_progress' AND k.fingerprint = EXCLUDED.fingerprint
       AND k.claimed_at <= now() - %(lease_s)s * interval '1 second')
RETURNING k.owner
"""
_SELECT = """
SELECT fingerprint, outcome FROM idempotency_keys
WHERE procedure = %s AND key = %s AND expires_at > now()
"""
_FINISH = """
UPDATE idempotency_keys SET status = 'done', outcome = %s
WHERE procedure = %s AND key = %s AND owner = %s AND status = 'in_progress'
"""
_RELEASE = """
DELETE FROM idempotency_keys
WHERE procedure = %s AND key = %s AND owner = %s AND status = 'in_progress'
"""
_PRUNE = "DELETE FROM idempotency_keys WHERE expires_at <= now()"


class PostgresIdempotencyStore:
    """Keys in the service's own `idempotency_keys` table, shared by its replicas and kept
    across restarts. Time is the database's `now()`, one clock for every replica."""

    def __init__(self, database: Database, settings: IdempotencySettings) -> None:
        self._database = database
        self._settings = settings

    async def claim(
        self, procedure: str, key: str, fingerprint: bytes
    ) -> Claimed | Existing | None:
        owner = uuid.uuid4()
        params = {
            "procedure": procedure,
            "key": key,
            "fingerprint": fingerprint,
            "owner": owner,
            "ttl_s": self._settings.ttl_s,
            "lease_s": self._settings.lease_s,
        }
        async with self._connection() as conn:
            # The INSERT decides the winner among concurrent duplicates: the others wait on
            # the winner's row lock, then find its row and get nothing back.
            if await (await conn.execute(_CLAIM, params)).fetchone() is not None:
                return Claimed(owner)
            row = await (await conn.execute(_SELECT, (procedure, key))).fetchone()
        if row is None:
            return None
        return Existing(bytes(row[0]), None if row[1] is None else outcome_from_json(row[1]))

    async def finish(self, procedure: str, key: str, owner: uuid.UUID, outcome: Outcome) -> None:
        async with self._connection() as conn:
            await conn.execute(_FINISH, (Jsonb(outcome_to_json(outcome)), procedure, key, owner))

    async def release(self, procedure: str, key: str, owner: uuid.UUID) -> None:
        async with self._connection() as conn:
            await conn.execute(_RELEASE, (procedure, key, owner))

    async def prune(self) -> int:
        async with self._connection() as conn:
            return (await conn.execute(_PRUNE)).rowcount

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncGenerator[psycopg.AsyncConnection, None]:
        try:
            async with self._database.connection() as conn:
                yield conn
        except (DatabaseUnavailable, psycopg.Error) as exc:
            raise StoreUnavailable(str(exc)) from exc


@dataclass
class _Entry:
    fingerprint: bytes
    owner: uuid.UUID
    claimed_at: float
    expires_at: float
    outcome: Outcome | None = None


class MemoryIdempotencyStore:
    """Keys in this process only, for a service without a database: at most `capacity` keys,
    the least recently used evicted first; lost on restart and not shared by replicas."""

    def __init__(
        self, settings: IdempotencySettings, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def claim(
        self, procedure: str, key: str, fingerprint: bytes
    ) -> Claimed | Existing | None:
        now = self._clock()
        entry = self._entries.get((procedure, key))
        if entry is not None and not self._claimable(entry, fingerprint, now):
            self._entries.move_to_end((procedure, key))
            return Existing(entry.fingerprint, entry.outcome)
        owner = uuid.uuid4()
        self._entries[(procedure, key)] = _Entry(
            fingerprint, owner, claimed_at=now, expires_at=now + self._settings.ttl_s
        )
        self._entries.move_to_end((procedure, key))
        while len(self._entries) > self._settings.memory_keys:
            self._entries.popitem(last=False)
        return Claimed(owner)

    def _claimable(self, entry: _Entry, fingerprint: bytes, now: float) -> bool:
        if entry.expires_at <= now:
            return True
        abandoned = now - entry.claimed_at >= self._settings.lease_s
        return entry.outcome is None and entry.fingerprint == fingerprint and abandoned

    async def finish(self, procedure: str, key: str, owner: uuid.UUID, outcome: Outcome) -> None:
        entry = self._entries.get((procedure, key))
        if entry is not None and entry.owner == owner and entry.outcome is None:
            entry.outcome = outcome

    async def release(self, procedure: str, key: str, owner: uuid.UUID) -> None:
        entry = self._entries.get((procedure, key))
        if entry is not None and entry.owner == owner and entry.outcome is None:
            del self._entries[(procedure, key)]

    async def prune(self) -> int:
        now = self._clock()
        expired = [k for k, entry in self._entries.items() if entry.expires_at <= now]
        for name in expired:
            del self._entries[name]
        return len(expired)


# --- running a call once -----------------------------------------------------------------


class IdempotencyRefused(Exception):
    """The call cannot run under this key; `code` and `status` say how to answer."""

    code = Code.FAILED_PRECONDITION
    status = 422


class KeyReused(IdempotencyRefused):
    """The key belongs to a different request."""

    code = Code.FAILED_PRECONDITION
    status = 422


class StillInProgress(IdempotencyRefused):
    """The call holding the key did not finish within the wait."""

    code = Code.ABORTED
    status = 409


class KeysUnavailable(IdempotencyRefused):
    """The store is away: running now could run the call twice."""

    code = Code.UNAVAILABLE
    status = 503


@dataclass(frozen=True)
class Ran:
    """How a call under a key ended, and whether it was replayed rather than run."""

    outcome: Outcome
    replayed: bool


class Idempotency(StartedResource):
    """Runs calls at most once per (procedure, key) with a store, and prunes it."""

    def __init__(self, store: IdempotencyStore, settings: IdempotencySettings) -> None:
        self.store = store
        self._settings = settings
        self._pruner: asyncio.Task[None] | None = None

    async def run(
        self,
        procedure: str,
        key: str,
        request_fingerprint: bytes,
        action: Callable[[], Awaitable[Outcome]],
    ) -> Ran:
        """The stored outcome of this key, or `action`'s after running it once.

        Raises `KeyReused`, `StillInProgress` or `KeysUnavailable` instead of running.
        """
        claim = await self._claim_or_wait(procedure, key, request_fingerprint)
        if isinstance(claim, Existing):
            assert claim.outcome is not None
            return Ran(claim.outcome, replayed=True)
        try:
            outcome = await action()
        except BaseException:
            # Crashed or cancelled: nothing to replay, so the next call with the key runs.
            await self._give_up(procedure, key, claim.owner)
            raise
        if is_transient(outcome):
            await self._give_up(procedure, key, claim.owner)
        else:
            await self._keep(procedure, key, claim.owner, outcome)
        return Ran(outcome, replayed=False)

    async def _claim_or_wait(
        self, procedure: str, key: str, request_fingerprint: bytes
    ) -> Claimed | Existing:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.wait_s
        pause = 0.01
        while True:
            try:
                found = await self.store.claim(procedure, key, request_fingerprint)
            except StoreUnavailable as exc:
                logger.warning("idempotency keys unavailable", extra={"error": str(exc)})
                raise KeysUnavailable(
                    f"{HEADER} cannot be checked right now (its store is unavailable); retry later"
                ) from exc
            if isinstance(found, Claimed):
                return found
            if found is not None:
                if found.fingerprint != request_fingerprint:
                    raise KeyReused(
                        f"{HEADER} {key!r} was already used for a different request to "
                        f"{procedure}; use a new key for a new request"
                    )
                if found.outcome is not None:
                    return found
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise StillInProgress(f"a call with this {HEADER} is still in progress")
                # Polled, backing off: the winner's outcome is one row update away.
                await asyncio.sleep(min(pause, remaining))
                pause = min(pause * 2, 0.2)

    async def _keep(self, procedure: str, key: str, owner: uuid.UUID, outcome: Outcome) -> None:
        try:
            await self.store.finish(procedure, key, owner, outcome)
        except StoreUnavailable as exc:
            # The answer still goes out; a repeat waits, then takes the claim over once its
            # lease has passed.
            logger.warning(
                "idempotent outcome not stored", extra={"procedure": procedure, "error": str(exc)}
            )

    async def _give_up(self, procedure: str, key: str, owner: uuid.UUID) -> None:
        try:
            await self.store.release(procedure, key, owner)
        except StoreUnavailable as exc:
            logger.warning(
                "idempotency claim not released", extra={"procedure": procedure, "error": str(exc)}
            )

    async def start(self) -> None:
        """Start pruning expired keys every `prune_interval_s`."""
        self._pruner = asyncio.create_task(self._prune_forever(), name="idempotency-pruner")

    async def close(self) -> None:
        """Stop pruning."""
        if self._pruner is not None:
            self._pruner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pruner

    async def _prune_forever(self) -> None:
        while True:
            await asyncio.sleep(self._settings.prune_interval_s)
            try:
                pruned = await self.store.prune()
            except StoreUnavailable as exc:
                logger.debug("idempotency keys not pruned", extra={"error": str(exc)})
                continue
            if pruned:
                logger.info("pruned expired idempotency keys", extra={"pruned": pruned})


def idempotency_for(database: Database | None, settings: IdempotencySettings) -> Idempotency:
    """Keys in the service's database when it has one, else in memory."""
    store: IdempotencyStore
    if database is not None:
        store = PostgresIdempotencyStore(database, settings)
    else:
        store = MemoryIdempotencyStore(settings)
    return Idempotency(store, settings)


# --- Connect -----------------------------------------------------------------------------


class IdempotencyInterceptor:
    """Connect interceptor: the declared unary procedures run once per `Idempotency-Key`
    (a request header in Connect and gRPC-Web, metadata in gRPC: the same to the server).

    Placed last, after the token check and input validation, so refused calls claim nothing.
    """

    def __init__(self, idempotency: Idempotency, calls: Sequence[IdempotentCall]) -> None:
        self._idempotency = idempotency
        self._calls = {call.procedure: call for call in calls}

    async def intercept_unary(
        self,
        call_next: Callable[[REQ, RequestContext[Any, Any]], Awaitable[RES]],
        request: REQ,
        ctx: RequestContext[Any, Any],
    ) -> RES:
        method = ctx.method
        procedure = f"/{method.service_name}/{method.name}"
        call = self._calls.get(procedure)
        if call is None or not isinstance(request, ProtoMessage):
            return await call_next(request, ctx)
        try:
            key = parse_key(ctx.request_headers.getall(HEADER))
        except InvalidKey as exc:
            raise ConnectError(Code.INVALID_ARGUMENT, str(exc)) from None
        if key is None:
            return await call_next(request, ctx)
        request_fingerprint = fingerprint(
            procedure, canonical_message(request, call.unfingerprinted)
        )
        # The first run's own response and error go out as they are (error details included).
        first: list[RES] = []
        failure: list[ConnectError] = []

        async def action() -> Outcome:
            try:
                response = await call_next(request, ctx)
            except ConnectError as exc:
                failure.append(exc)
                return ErrorOutcome(exc.code, exc.message)
            first.append(response)
            assert isinstance(response, ProtoMessage)
            return MessageOutcome(
                response.DESCRIPTOR.full_name, response.SerializeToString(deterministic=True)
            )

        try:
            ran = await self._idempotency.run(procedure, key, request_fingerprint, action)
        except IdempotencyRefused as exc:
            raise ConnectError(exc.code, str(exc)) from None
        if failure:
            raise failure[0]
        if first:
            return first[0]
        ctx.response_headers[REPLAYED_HEADER] = "true"
        return _replayed(ran.outcome, method.output)


def _replayed(outcome: Outcome, output: type[RES]) -> RES:
    if isinstance(outcome, ErrorOutcome):
        raise ConnectError(outcome.code, outcome.message)
    if not isinstance(outcome, MessageOutcome):
        raise ConnectError(Code.INTERNAL, "stored outcome is not a Connect response")
    # connectrpc types a method's output as a bare type variable; it is a protobuf message.
    message_class = cast("type[ProtoMessage]", output)
    return cast(RES, message_class.FromString(outcome.data))


# --- REST --------------------------------------------------------------------------------


class IdempotentRoutes:
    """ASGI middleware: the declared REST routes (`POST /auth/register`) run once per
    `Idempotency-Key`; a repeat gets the stored status and JSON body."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        idempotency: Idempotency,
        calls: Sequence[IdempotentCall],
        max_body_bytes: int,
    ) -> None:
        self._app = app
        self._idempotency = idempotency
        self._calls = {call.procedure: call for call in calls}
        self._max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        call = None
        if scope["type"] == "http":
            call = self._calls.get(f"{scope['method']} {scope['path']}")
        if call is None:
            await self._app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        try:
            key = parse_key(headers.getlist(HEADER))
        except InvalidKey as exc:
            await json_error(400, str(exc))(scope, receive, send)
            return
        if key is None:
            await self._app(scope, receive, send)
            return
        try:
            body = await _read_body(receive, self._max_body_bytes)
        except _ClientGone:
            return
        if body is None:
            await json_error(413, f"body larger than {self._max_body_bytes} bytes")(
                scope, receive, send
            )
            return
        canonical = canonical_json_body(headers.get("content-type"), body, call.unfingerprinted)
        request_fingerprint = fingerprint(call.procedure, canonical)

        async def action() -> Outcome:
            return await _run_and_capture(self._app, scope, body, receive, send)

        try:
            ran = await self._idempotency.run(call.procedure, key, request_fingerprint, action)
        except IdempotencyRefused as exc:
            await json_error(exc.status, str(exc))(scope, receive, send)
            return
        if ran.replayed:
            await _send_outcome(ran.outcome, send)


class _ClientGone(Exception):
    """The client disconnected before its request body was complete."""


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None when it is larger than `limit`."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        body += message.get("body", b"")
        if len(body) > limit:
            return None
        if not message.get("more_body", False):
            break
    return bytes(body)


async def _run_and_capture(
    app: ASGIApp, scope: Scope, body: bytes, receive: Receive, send: Send
) -> Outcome:
    """Run the route on the buffered body, answering live and keeping a copy of the answer."""
    delivered = False

    async def replay_body() -> Message:
        nonlocal delivered
        if delivered:
            # The route has its body; all that can follow is the client going away.
            return await receive()
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    status = 500
    content_type = "application/json"
    chunks: list[bytes] = []

    async def capturing_send(message: Message) -> None:
        nonlocal status, content_type
        if message["type"] == "http.response.start":
            status = message["status"]
            content_type = Headers(raw=message.get("headers", [])).get("content-type", content_type)
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
        await send(message)

    await app(scope, replay_body, capturing_send)
    return HttpOutcome(status, content_type, b"".join(chunks))


async def _send_outcome(outcome: Outcome, send: Send) -> None:
    if not isinstance(outcome, HttpOutcome):
        raise TypeError("stored outcome is not a REST answer")
    await send(
        {
            "type": "http.response.start",
            "status": outcome.status,
            "headers": [
                (b"content-type", outcome.content_type.encode("latin-1")),
                (b"content-length", str(len(outcome.body)).encode()),
                (REPLAYED_HEADER.lower().encode(), b"true"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": outcome.body})
