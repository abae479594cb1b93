"""`make breaking`: buf lint, and buf breaking against the previous commit's protos, run by
the real Makefile target on scratch git repositories and on this checkout."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.support.commands import BIN

ROOT = Path(__file__).resolve().parent.parent


def make_breaking(repo: Path) -> subprocess.CompletedProcess[str]:
    """The Makefile's `breaking` target, run in `repo` with this checkout's tools (`-o setup`:
    the venv is already set up)."""
    return subprocess.run(
        ["make", "--no-print-directory", "-f", str(ROOT / "Makefile"), "-C", str(repo),
         "-o", "setup", f"BIN={BIN}", "breaking"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def git(repo: Path, *args: str) -> None:
    identity = ["-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run(["git", *identity, *args], cwd=repo, check=True, capture_output=True)


def scratch_repo(tmp_path: Path) -> Path:
    """A git repository holding a copy of proto/ and buf.yaml, committed once."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(ROOT / "proto", repo / "proto")
    shutil.copy(ROOT / "buf.yaml", repo / "buf.yaml")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "protos")
    return repo


def edit(repo: Path, path: str, old: str, new: str) -> None:
    file = repo / path
    text = file.read_text()
    assert old in text
    file.write_text(text.replace(old, new))
    git(repo, "commit", "-q", "-am", f"edit {path}")


def test_a_removed_field_fails_breaking(tmp_path: Path) -> None:
    repo = scratch_repo(tmp_path)
    edit(repo, "proto/gateway/v1/gateway.proto", "  string name = 1;\n", "")
    result = make_breaking(repo)
    assert result.returncode != 0
    assert 'field "1" with name "name"' in result.stdout + result.stderr


def test_an_added_field_passes_breaking(tmp_path: Path) -> None:
    repo = scratch_repo(tmp_path)
    edit(
        repo,
        "proto/gateway/v1/gateway.proto",
        "  string name = 1;\n",
        "  string name = 1;\n  string locale = 2;\n",
    )
    result = make_breaking(repo)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "buf breaking --against" in result.stdout


def test_a_clone_without_the_parent_commit_skips_and_says_so(tmp_path: Path) -> None:
    repo = scratch_repo(tmp_path)
    edit(repo, "proto/gateway/v1/gateway.proto", "  string name = 1;\n", "")
    shallow = tmp_path / "shallow"
    subprocess.run(
        ["git", "clone", "-q", "--depth", "1", f"file://{repo}", str(shallow)],
        check=True, capture_output=True,
    )  # fmt: skip
    result = make_breaking(shallow)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SKIPPED: this clone has no parent commit" in result.stdout


def test_main_passes_lint_and_breaking() -> None:
    result = make_breaking(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
