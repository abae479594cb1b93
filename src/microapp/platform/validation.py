"""What every Connect call passes through in `build_app`: text holding NUL is refused on the
way in, and an unexpected error leaves as a generic `internal` on the way out.

PostgreSQL cannot store NUL in text, so a NUL that reached a service became a database error
(`unknown`, with PostgreSQL's own text) or a failed write-behind batch; refusing it here
covers every string field of every service at once.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from microapp.platform.rest import INTERNAL_ERROR_MESSAGE

logger = logging.getLogger(__name__)

REQ = TypeVar("REQ")
RES = TypeVar("RES")

_STRING = FieldDescriptor.TYPE_STRING
_MESSAGE = FieldDescriptor.TYPE_MESSAGE


def field_holding_nul(message: Message) -> str | None:
    """The path of a string field (or map key) in `message` that contains NUL, e.g. `name`,
    `items[2].name` or `labels['k']`; None when there is none.

    Walks nested, repeated and map fields with an explicit stack, so a deeply nested
    message cannot exhaust Python's recursion limit.
    """
    stack: list[tuple[Message, str]] = [(message, "")]
    while stack:
        current, prefix = stack.pop()
        for field, value in current.ListFields():
            path = prefix + field.name
            for item_path, item in _items(field, value, path):
                if isinstance(item, str):
                    if "\x00" in item:
                        return item_path
                elif isinstance(item, Message):
                    stack.append((item, item_path + "."))
    return None


def _items(field: FieldDescriptor, value: Any, path: str) -> list[tuple[str, object]]:
    """The strings and messages one set field holds, each with its path; map keys included."""
    if field.type not in (_STRING, _MESSAGE):
        return []
    if field.type == _MESSAGE and _is_map_entry(field):
        items: list[tuple[str, object]] = []
        for key, item in value.items():
            item_path = f"{path}[{key!r}]"
            items.append((f"{path} key {key!r}", key))
            items.append((item_path, item))
        return items
    if field.is_repeated:
        return [(f"{path}[{index}]", item) for index, item in enumerate(value)]
    return [(path, value)]


def _is_map_entry(field: FieldDescriptor) -> bool:
    """A message field is a map when its (synthetic) entry type says so; every message
    field has a message type, which protobuf's stubs leave optional."""
    entry = field.message_type
    return entry is not None and entry.GetOptions().map_entry


@functools.cache
def _flat_text_fields(descriptor: Descriptor) -> tuple[str, ...] | None:
    """The names of a message type's string fields when they are all it can hold text in
    (no message, map or repeated string fields, no extensions); None otherwise.

    Computed once per message type, so that the common request (a few plain strings) is
    checked by reading those fields alone instead of walking `ListFields()`.
    """
    if descriptor.extension_ranges:
        return None
    names: list[str] = []
    for field in descriptor.fields:
        if field.type == _MESSAGE or (field.type == _STRING and field.is_repeated):
            return None
        if field.type == _STRING:
            names.append(field.name)
    return tuple(names)


def _may_hold_nul(message: Message) -> bool:
    """A cheap test that is False only when no string in `message` holds NUL."""
    names = _flat_text_fields(message.DESCRIPTOR)
    if names is None:
        # Nested text: UTF-8 writes NUL as a 0 byte, so a serialization without one
        # holds no NUL anywhere; with one (a 0 byte may be a length or a number) walk.
        return b"\x00" in message.SerializeToString()
    return any("\x00" in getattr(message, name) for name in names)


def _refuse_nul(message: object) -> None:
    if (
        isinstance(message, Message)
        and _may_hold_nul(message)
        and (path := field_holding_nul(message)) is not None
    ):
        raise ConnectError(Code.INVALID_ARGUMENT, f"{path} must not contain NUL characters")


class RejectNulText:
    """Connect interceptor: `invalid_argument` naming the field when any string in a request
    message contains NUL, before the handler runs."""

    async def intercept_unary(
        self,
        call_next: Callable[[REQ, RequestContext[Any, Any]], Awaitable[RES]],
        request: REQ,
        ctx: RequestContext[Any, Any],
    ) -> RES:
        _refuse_nul(request)
        return await call_next(request, ctx)

    async def intercept_client_stream(
        self,
        call_next: Callable[[AsyncIterator[REQ], RequestContext[Any, Any]], Awaitable[RES]],
        request: AsyncIterator[REQ],
        ctx: RequestContext[Any, Any],
    ) -> RES:
        return await call_next(_checked(request), ctx)

    async def intercept_server_stream(
        self,
        call_next: Callable[[REQ, RequestContext[Any, Any]], AsyncIterator[RES]],
        request: REQ,
        ctx: RequestContext[Any, Any],
    ) -> AsyncIterator[RES]:
        _refuse_nul(request)
        async for response in call_next(request, ctx):
            yield response

    async def intercept_bidi_stream(
        self,
        call_next: Callable[[AsyncIterator[REQ], RequestContext[Any, Any]], AsyncIterator[RES]],
        request: AsyncIterator[REQ],
        ctx: RequestContext[Any, Any],
    ) -> AsyncIterator[RES]:
        async for response in call_next(_checked(request), ctx):
            yield response


async def _checked(messages: AsyncIterator[REQ]) -> AsyncIterator[REQ]:
    async for message in messages:
        _refuse_nul(message)
        yield message


class GenericInternalErrors:
    """Connect metadata interceptor: any exception other than a `ConnectError` is logged once
    with its traceback and answered `internal` with a generic message.

    connectrpc would otherwise answer `unknown` with `str(exc)` — a psycopg error's text,
    a file path, a secret — and re-raise it for the server to log a second time. Placed
    first in the interceptor list it is hoisted (run around the whole call) and its
    `on_end`, run last, replaces the error every other interceptor and the handler saw.
    """

    async def on_start(self, ctx: RequestContext[Any, Any]) -> None:
        return None

    async def on_end(
        self, token: None, ctx: RequestContext[Any, Any], error: Exception | None
    ) -> None:
        if error is None or isinstance(error, ConnectError):
            return
        method = ctx.method
        procedure = f"/{method.service_name}/{method.name}"
        logger.error(
            "unhandled error in a Connect handler",
            exc_info=error,
            extra={"procedure": procedure},
        )
        raise ConnectError(Code.INTERNAL, INTERNAL_ERROR_MESSAGE) from error
