"""Which status custom-lang answers for which name: defaults, overridable by env."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TypeGuard

from microapp.platform.config import ConfigError
from microapp.platform.rest import json_object

DEFAULT_RULES: Mapping[str, int] = {
    "unauthorized": 401,
    "forbidden": 403,
    "notfound": 404,
    "conflict": 409,
    "ratelimit": 429,
    "unavailable": 503,
}


def _is_allowed_status(value: object) -> TypeGuard[int]:
    # 200 answers the greeting; an error status answers {"error": ...}. Other 2xx, 1xx
    # and 3xx make no sense for a JSON invocation, so they are refused at startup.
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and (value == 200 or 400 <= value <= 599)
    )


def parse_rules(raw: str, variable: str = "LANG_RESPONSE_RULES") -> dict[str, int]:
    """The defaults with the JSON object `raw` (name → status) merged over them."""
    rules = dict(DEFAULT_RULES)
    if not raw.strip():
        return rules
    try:
        value = json_object(json.loads(raw))
    except ValueError as exc:
        raise ConfigError(f"{variable} must be a JSON object of name → status: {exc}") from None
    if value is None:
        raise ConfigError(
            f'{variable} must be a JSON object of name → status, e.g. {{"busy": 503}}'
        )
    for name, status in value.items():
        if not _is_allowed_status(status):
            raise ConfigError(
                f"{variable}: the status for {name!r} must be 200 or an integer from 400 "
                f"to 599, got {status!r}"
            )
        rules[name] = status
    return rules
