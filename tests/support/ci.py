"""Missing tools: a skip on a developer's machine, a failure in CI.

A test suite that skips silently in CI proves nothing; under `CI=true` a missing
browser or toolchain is an error of the CI image, and the run must say so.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import NoReturn

import pytest


def in_ci(env: Mapping[str, str] | None = None) -> bool:
    """True when `CI` says we run in continuous integration (GitHub, GitLab: `true`)."""
    value = (os.environ if env is None else env).get("CI", "").strip().lower()
    return value in {"true", "1", "yes"}


def missing(reason: str, *, env: Mapping[str, str] | None = None) -> NoReturn:
    """Skip the test for `reason`, or fail it under CI."""
    if in_ci(env):
        pytest.fail(f"required under CI=true: {reason}", pytrace=False)
    pytest.skip(reason)
