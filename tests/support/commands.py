"""Run command-line tools without blocking the test's event loop (which serves the
external target)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: str
    stderr: str


async def run(
    *args: str,
    timeout: float = 60.0,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> Completed:
    """Run a command to completion, asynchronously (in this environment unless `env`)."""
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=cwd
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Completed(proc.returncode, out.decode(), err.decode())


async def buf_curl(url: str, data: str, *, protocol: str = "connect") -> Completed:
    """`buf curl` over h2c with prior knowledge, schema from server reflection."""
    return await run(
        str(BIN / "buf"), "curl", "--protocol", protocol, "--http2-prior-knowledge",
        "-d", data, url,
    )  # fmt: skip
