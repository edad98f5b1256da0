"""``memfed bench evolve``: learned, scoped and gradient-free editing, and modules that improve from feedback.

Parts, each on the embedded model and the test split of the shipped edit cases (``split_cases``: by
subject, so the learned editor is scored on subjects it never saw edited):

* ``mend`` (``memfed.bench.evolve_mend``): the MEND-style editor trained on the train split; efficacy,
  generalization, locality and milliseconds per edit, single edits and 100 in one batch, next to ROME on
  the same cases in the same run (ROME's seconds per edit included);
* ``scope`` (``memfed.bench.evolve_scope``): the SERAC-style edit memory at 1,000 edits (test cases plus
  insertions about invented subjects), the scope classifier's precision and recall; the gradient-free
  edit next to ROME;
* ``feedback`` (``memfed.bench.evolve_feedback``): a module's accuracy on held-out questions before and
  after 5 rounds of simulated users' feedback, honest and with 20% adversarial users.

Torch runs on one thread (``one_torch_thread``); each part also runs alone (``run_part``).
"""

from __future__ import annotations

import importlib
import time
from typing import Any

from memfed.bench.harness import BenchResult, one_torch_thread

PARTS: dict[str, str] = {
    "mend": "memfed.bench.evolve_mend",
    "scope": "memfed.bench.evolve_scope",
    "feedback": "memfed.bench.evolve_feedback",
}

BASELINE: dict[str, Any] = {
    "rome": "ROME (memfed.node.editing.rome) on the same test cases in the same run: value optimised per "
    "edit (node/editing/value.py DEFAULT_VALUE), rank-one closed form at the traced layer, every subject "
    "token keyed",
    "feedback_start": "the module as it was before any feedback (its accuracy is the bar to beat)",
    "threads": 1,
}


def run(*, quick: bool = False) -> BenchResult:
    with one_torch_thread():
        return _run(quick)


def _run(quick: bool) -> BenchResult:
    metrics: dict[str, float] = {}
    for part, module in PARTS.items():
        t0 = time.perf_counter()
        # Parts name their figures apart (ROME runs in the mend part only; gradient-free is scored on its
        # cases and layer).
        metrics.update(importlib.import_module(module).run_part(quick))
        metrics[f"{part}_seconds"] = round(time.perf_counter() - t0, 1)
    before = metrics.get("evolve_acc_before")
    if before is not None:
        if "evolve_acc_after" in metrics:
            metrics["evolve_gain"] = round(metrics["evolve_acc_after"] - before, 4)
        if "evolve_acc_after_poisoned" in metrics:
            metrics["evolve_gain_poisoned"] = round(metrics["evolve_acc_after_poisoned"] - before, 4)
    ratios: dict[str, float] = {}
    mend_ms, rome_s = metrics.get("mend_ms_per_edit"), metrics.get("rome_s_per_edit")
    if mend_ms and rome_s:
        ratios["rome_time_vs_mend"] = round(rome_s * 1000.0 / mend_ms, 1)
    return BenchResult(metrics=metrics, baseline=dict(BASELINE), ratios=ratios)
