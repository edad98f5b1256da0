"""``memfed bench all``: every bench in sequence, each in a fresh process, then the report.

A fresh process per bench keeps one bench's threads, caches and imported models from skewing the next
one's timings, and lets a bench that crashes (or is killed for memory) be reported as failed while the
others still run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from memfed.bench.harness import BENCHES

# The order benches run in: cheap ones first, so a quick look at the report needs little waiting.
ORDER: tuple[str, ...] = (
    "store",
    "seal",
    "swap",
    "sync",
    "watermark",
    "edit",
    "evolve",
    "internalize",
    "fed",
)


def ordered(only: Sequence[str] | None = None) -> list[str]:
    """The benches to run: ``only`` (in ORDER's order) or every registered bench."""
    names = [n for n in ORDER if n in BENCHES] + sorted(set(BENCHES) - set(ORDER))
    if only:
        unknown = sorted(set(only) - set(BENCHES))
        if unknown:
            from memfed.errors import NotFoundError

            raise NotFoundError(
                f"no bench named {', '.join(unknown)}", hint=f"choose from: {', '.join(sorted(BENCHES))}"
            )
        names = [n for n in names if n in only]
    return names


def run_one(name: str, *, quick: bool, timeout: float | None = None) -> dict[str, Any]:
    """Run ``memfed bench NAME --json`` in a child process; ``{"ok", "seconds", "report" | "error"}``."""
    cmd = [sys.executable, "-m", "memfed.cli.main", "bench", name, "--json", *(["--quick"] if quick else [])]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"ok": False, "seconds": time.perf_counter() - t0, "error": f"timed out after {timeout:g} s"}
    seconds = time.perf_counter() - t0
    if proc.returncode == 0:
        try:
            return {"ok": True, "seconds": seconds, "report": json.loads(proc.stdout)}
        except json.JSONDecodeError as e:
            return {"ok": False, "seconds": seconds, "error": f"unreadable JSON on stdout: {e}"}
    tail = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    return {
        "ok": False,
        "seconds": seconds,
        "error": f"exit {proc.returncode}: {tail[-1] if tail else 'no message'}",
    }


def run_all(
    names: Sequence[str],
    *,
    quick: bool,
    timeout: float | None = None,
    on_done: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run ``names`` one after another (the 2 cores are shared: benches in parallel would time each
    other); ``on_done`` is called after each, for progress output."""
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        results[name] = run_one(name, quick=quick, timeout=timeout)
        if on_done is not None:
            on_done(name, results[name])
    return results
