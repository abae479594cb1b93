"""The web console in a real Chromium: Debian's browser driven by Playwright's async API.

No browser is ever downloaded: the tests use `/usr/bin/chromium` (or `$MICROAPP_CHROMIUM`)
and skip, saying so, only where there is none; under `CI=true` they fail instead.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.support.ci import missing
from tests.support.services import ServiceProcess

ROOT = Path(__file__).resolve().parent.parent.parent
# Screenshots of the panels land here (git-ignored); CI keeps the folder as its artifacts.
ARTIFACTS = ROOT / "test-artifacts" / "web-console"

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def chromium_candidates() -> list[str]:
    """Where a Chromium may be, in order of preference."""
    wanted = os.environ.get("MICROAPP_CHROMIUM", "").strip()
    return [wanted, "/usr/bin/chromium", shutil.which("chromium") or ""]


def chromium_executable(candidates: Sequence[str] | None = None) -> str | None:
    """Debian's Chromium (or `$MICROAPP_CHROMIUM`), if this machine has one."""
    for candidate in chromium_candidates() if candidates is None else candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


NO_CHROMIUM = (
    "no Chromium on this machine: the web console tests drive Debian's /usr/bin/chromium "
    "(`apt-get install chromium`, which .ci/run does when it is missing) or $MICROAPP_CHROMIUM"
)


def require_chromium(
    candidates: Sequence[str] | None = None, *, env: Mapping[str, str] | None = None
) -> str:
    """The Chromium to drive; skips the test without one (fails it under `CI=true`)."""
    executable = chromium_executable(candidates)
    if executable is None:
        missing(NO_CHROMIUM, env=env)
    return executable


def service_on_port(name: str, port: int, env: Mapping[str, str] | None = None) -> ServiceProcess:
    """A `ServiceProcess` on a port chosen beforehand.

    The console's origin (its port) must be known before the services that allow it
    by CORS are configured, and the console needs their URLs: one of the two is picked first.
    """
    service = ServiceProcess(name, env)
    service.port = port
    service.url = f"http://127.0.0.1:{port}"
    return service


class ServiceGroup:
    """Several services started at once (their URLs are known before they run) and stopped
    together; a service that fails to start stops the others and raises with its log."""

    def __init__(self, services: Sequence[ServiceProcess]) -> None:
        self.services = list(services)

    async def __aenter__(self) -> ServiceGroup:
        results = await asyncio.gather(
            *(service.__aenter__() for service in self.services), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            await self._stop()
            raise failures[0]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stop()

    async def _stop(self) -> None:
        started = [s for s in self.services if s.process is not None]
        await asyncio.gather(*(s.__aexit__(None, None, None) for s in started))
