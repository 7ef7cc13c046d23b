"""The one place that prints: rich consoles, rank-0 gating, tables. Results that matter are also written as JSON.

``out`` writes results (tables, JSON) to stdout; ``err`` writes progress, warnings and errors to stderr, so
``perft plan --json > plan.json`` stays clean.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def is_main_process() -> bool:
    """Rank 0 (or a single process). Reads the launcher's environment so it works before Accelerate starts."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def info(message: str) -> None:
    """A progress line on stderr (rank 0). Plain text (a path's ``[...]`` is not markup); never wrapped, so paths
    stay copyable."""
    if is_main_process():
        err.print(escape(message), soft_wrap=True)


def warn(message: str) -> None:
    """A warning line on stderr (rank 0), plain text, never wrapped."""
    if is_main_process():
        err.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)


def print_json(data: Any) -> None:
    """One JSON object on stdout (plain print: no rich markup or wrapping)."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def human_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def pct(x: float | None) -> str:
    """A share as a percentage with two decimals for result tables, "-" when there is none."""
    return "-" if x is None else f"{100 * x:.2f}"
