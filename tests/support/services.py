"""Services as real `microapp serve` processes (Hypercorn, h2c) on free ports."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import aiohttp

from tests.support.environment import SERVICE_VARIABLES
from tests.support.ports import free_port

# Never leak the developer's own service settings into a test's service (conftest.py
# clears them for the session too; this holds for a ServiceProcess made outside it).
_SERVICE_VARIABLES = SERVICE_VARIABLES
# Test targets live on loopback, which caller refuses by default; a test of that refusal
# passes CALLER_ALLOW_PRIVATE_NETWORKS=0 in its own env.
_TEST_DEFAULTS = {"caller": {"CALLER_ALLOW_PRIVATE_NETWORKS": "1"}}


class ServiceProcess:
    """`python -m microapp serve NAME` with the given environment, on a free port.

    Use as `async with ServiceProcess("greeter", env) as svc:`; `svc.url` is its base URL.
    Leaving the block sends SIGTERM and waits for the process to exit.
    """

    def __init__(
        self, name: str, env: Mapping[str, str] | None = None, args: Sequence[str] = ()
    ) -> None:
        self.name = name
        self._args = list(args)  # more options of `microapp serve`, e.g. --workers 2
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        inherited = {k: v for k, v in os.environ.items() if k not in _SERVICE_VARIABLES}
        self._env = {**inherited, **_TEST_DEFAULTS.get(name, {}), **(env or {})}
        # Only the path is kept: the process gets its own handle, so none stays open here.
        with tempfile.NamedTemporaryFile(
            prefix=f"microapp-{name}-", suffix=".log", delete=False
        ) as log:
            self._log_path = Path(log.name)
        self.process: asyncio.subprocess.Process | None = None

    @property
    def log_path(self) -> Path:
        return self._log_path

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def start(self, *, timeout: float = 30.0) -> None:
        """Start the process and wait until it answers /livez."""
        with self._log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "microapp", "serve", self.name,
                "--host", "127.0.0.1", "--port", str(self.port), *self._args,
                env=self._env, stdout=log, stderr=log,
            )  # fmt: skip
        await self.wait_for("/livez", 200, timeout=timeout)

    async def wait_for(self, path: str, status: int, *, timeout: float = 30.0) -> None:
        """Poll `path` until it answers `status`; fail with the service's log if it never does."""
        deadline = asyncio.get_running_loop().time() + timeout
        async with aiohttp.ClientSession() as session:
            while True:
                assert self.process is not None
                if self.process.returncode is not None:
                    raise RuntimeError(f"{self.name} exited early:\n{self.logs()}")
                try:
                    async with session.get(self.url + path) as resp:
                        if resp.status == status:
                            return
                except aiohttp.ClientError:
                    pass
                if asyncio.get_running_loop().time() > deadline:
                    raise TimeoutError(f"{self.name}{path} never answered {status}:\n{self.logs()}")
                await asyncio.sleep(0.05)

    async def stop(self, sig: int = signal.SIGTERM, *, timeout: float = 20.0) -> int:
        """Signal the process and wait for it to exit; returns its exit code."""
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(sig)
            try:
                async with asyncio.timeout(timeout):
                    await self.process.wait()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
                raise
        return self.process.returncode

    async def __aenter__(self) -> ServiceProcess:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
