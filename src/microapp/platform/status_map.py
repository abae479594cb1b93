"""HTTP status → Connect code, as the gateway and custom-lang report a downstream answer."""

from __future__ import annotations

from connectrpc.code import Code

_CODES = {
    400: Code.INVALID_ARGUMENT,
    401: Code.UNAUTHENTICATED,
    403: Code.PERMISSION_DENIED,
    404: Code.NOT_FOUND,
    409: Code.ALREADY_EXISTS,
    429: Code.RESOURCE_EXHAUSTED,
    502: Code.UNAVAILABLE,
    503: Code.UNAVAILABLE,
    504: Code.DEADLINE_EXCEEDED,
}


def connect_code_for_status(status: int) -> Code:
    """The Connect code of an HTTP error status: the table above, other 5xx `internal`,
    anything else `unknown`."""
    code = _CODES.get(status)
    if code is not None:
        return code
    if 500 <= status <= 599:
        return Code.INTERNAL
    return Code.UNKNOWN
