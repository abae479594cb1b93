"""The developer's service settings, kept out of the test session.

A `DATABASE_URL`, `PORT` or `MICROAPP_SERVER` exported in a developer's shell must not
change what a test runs against: tests pass what they want explicitly.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent

# Named here as well as read from the docs, so they go even if a docs table moves.
SERVICE_VARIABLES = frozenset(
    {"DATABASE_URL", "PORT", "HOST", "OTEL_EXPORTER_OTLP_ENDPOINT", "MICROAPP_SERVER"}
)
_DOCUMENTED = re.compile(r"^\| `([A-Z][A-Z0-9_]*)` \|", re.MULTILINE)


def documented_settings(configuration: Path = ROOT / "docs" / "configuration.md") -> set[str]:
    """Every variable in a table row of docs/configuration.md."""
    return set(_DOCUMENTED.findall(configuration.read_text()))


def is_service_setting(name: str, documented: set[str]) -> bool:
    """A variable a service (or its OpenTelemetry SDK) reads."""
    return name in SERVICE_VARIABLES or name in documented or name.startswith("OTEL_")


@contextmanager
def without_service_settings(environ: MutableMapping[str, str]) -> Iterator[dict[str, str]]:
    """Remove the service settings from `environ` for the block; yields what was removed."""
    documented = documented_settings()
    removed = {k: environ.pop(k) for k in list(environ) if is_service_setting(k, documented)}
    try:
        yield removed
    finally:
        environ.update(removed)
