"""The protos lint clean and the committed generated code is what `buf generate` makes."""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _buf(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(
        [str(BIN / "buf"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_buf_lint_finds_no_problem() -> None:
    result = _buf("lint", cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_code_is_what_buf_generate_makes(tmp_path: Path) -> None:
    for name in ("buf.yaml", "buf.gen.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    result = _buf("generate", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr

    fresh = tmp_path / "src" / "microapp" / "gen"
    committed = ROOT / "src" / "microapp" / "gen"
    stale = _differences(filecmp.dircmp(fresh, committed, ignore=["__pycache__"]))
    assert not stale, f"src/microapp/gen is stale, run `make gen`: {stale}"


def _differences(cmp: filecmp.dircmp[str]) -> list[str]:
    out = [*cmp.left_only, *cmp.right_only, *cmp.diff_files, *cmp.funny_files]
    for sub in cmp.subdirs.values():
        out += _differences(sub)
    return out
