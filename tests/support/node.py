"""The Node.js toolchain some tests need: the connect-node clients and the console build."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

from tests.support.ci import missing


def require_node(
    *installed: Path, hint: str, env: Mapping[str, str] | None = None, node: str = "node"
) -> str:
    """The `node` binary, once every path in `installed` exists; skips the test otherwise
    (fails it under `CI=true`), naming what is missing and `hint` on how to get it."""
    executable = shutil.which(node)
    if executable is None:
        missing(f"{node} is not installed", env=env)
    for path in installed:
        if not path.exists():
            missing(f"{path} is missing: {hint}", env=env)
    return executable
