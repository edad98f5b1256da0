"""The bench harness: registry of benches, timing helpers and the JSON report shape.

A report is ``{"bench", "metrics", "baseline", "ratios", "series", "env"}``; ``series`` holds lists (a figure
against a swept parameter) that the report's plots draw, and is empty for benches that sweep nothing.
A ratio named ``x_vs_y`` is x's figure over y's (for times: memfed's seconds over the baseline's, so lower
is better). Figures are medians.
"""

from __future__ import annotations

import importlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

# name -> "module:function"; the function takes ``quick: bool`` and returns a BenchResult.
BENCHES: dict[str, str] = {
    "store": "memfed.bench.store:run",
    "seal": "memfed.bench.seal:run",
    "swap": "memfed.bench.swap:run",
    "internalize": "memfed.bench.internalize:run",
    "edit": "memfed.bench.edit:run",
    "fed": "memfed.bench.fed:run",
    "sync": "memfed.bench.sync:run",
    "watermark": "memfed.bench.watermark:run",
    "evolve": "memfed.bench.evolve:run",
}


@dataclass
class BenchResult:
    """What one bench measured. ``baseline`` names the competitor and its settings, not only figures."""

    metrics: dict[str, float] = field(default_factory=dict)
    baseline: dict[str, Any] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    # name -> {axis: list of numbers}; kept apart from ``metrics`` so the scalar figures stay flat.
    series: dict[str, dict[str, list[Any]]] = field(default_factory=dict)


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread for the block, restored after. The benches on the embedded model run small
    matrices on this machine's two shared cores: two threads ran forward passes 10-50x slower than one
    whenever the other core was busy (OpenMP workers wait on each other)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def median_seconds(
    fn: Callable[[], object], *, repeats: int, setup: Callable[[], object] | None = None
) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs; ``setup`` runs untimed before each."""
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor()


def environment() -> dict[str, Any]:
    """Facts about the machine a figure was measured on."""
    import memfed

    env: dict[str, Any] = {
        "memfed": memfed.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        # The CPU family matters twice: for speed, and for the embedded model's weights (its build picks
        # GEMM kernels by CPU, so an Intel and an AMD build differ).
        "cpu": _cpu_model(),
    }
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        env["torch"] = None
    return env


def run_bench(name: str, *, quick: bool = False) -> dict[str, Any]:
    """Run one registered bench and return its report."""
    if name not in BENCHES:
        from memfed.errors import NotFoundError

        raise NotFoundError(f"no bench named {name!r}", hint=f"choose one of: {', '.join(sorted(BENCHES))}")
    module_name, func_name = BENCHES[name].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    result: BenchResult = func(quick=quick)
    return {
        "bench": name,
        "metrics": result.metrics,
        "baseline": result.baseline,
        "ratios": result.ratios,
        "series": result.series,
        "env": environment(),
    }
