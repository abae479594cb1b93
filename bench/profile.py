"""Reads py-spy's raw (collapsed stack) output: where the server spends its CPU."""

from __future__ import annotations

import re
from collections import Counter

# Ordered: the first pattern matching a frame's file names its package. py-spy writes
# files relative to their sys.path entry, e.g. "h2/connection.py".
PACKAGES = [
    (
        "entry point (runner)",
        r"^(bench/|microapp/platform/server\.py|<frozen runpy>|asyncio/runners)",
    ),
    ("hypercorn (HTTP/2 server)", r"^hypercorn/"),
    ("h2 + hpack (HTTP/2 state machine)", r"^(h2|hpack|hyperframe)/"),
    ("connectrpc (Connect protocol)", r"^connectrpc/"),
    ("starlette (routing, middleware)", r"^starlette/"),
    ("protobuf", r"^google/protobuf/"),
    ("microapp platform (dispatch, access log, validation)", r"^microapp/platform/"),
    ("microapp handler and generated code", r"^microapp/"),
    ("asyncio / uvloop (event loop, socket writes)", r"^(asyncio|uvloop)/"),
]
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]*)(?::\d+)?\)$")


def package_of(file: str) -> str:
    for name, pattern in PACKAGES:
        if re.search(pattern, file):
            return name
    return "other (stdlib, typing, logging, ...)"


def summarize_profile(raw: str, *, top: int = 15) -> dict[str, object]:
    """Self time by package and by function, and inclusive time by package."""
    self_by_package: Counter[str] = Counter()
    self_by_function: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_FRAME.match(f) for f in stack.split(";")]
        parsed = [(m["func"], m["file"]) for m in frames if m]
        if not parsed:
            continue
        total += count
        func, file = parsed[-1]
        self_by_package[package_of(file)] += count
        self_by_function[f"{func} ({file})"] += count
        for name in {package_of(f) for _, f in parsed} - {PACKAGES[0][0]}:
            inclusive[name] += count
    if total == 0:
        return {"samples": 0}
    return {
        "samples": total,
        "by_package": {k: v / total for k, v in self_by_package.most_common()},
        "inclusive_by_package": {k: v / total for k, v in inclusive.most_common()},
        "top_functions": {k: v / total for k, v in self_by_function.most_common(top)},
    }
