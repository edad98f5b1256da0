"""The goal of every reported figure, written down once.

The issues each end with a "Bench" section naming keys and goals; the report compares a run against this
table, so a goal changes in one place and the Markdown table, the JSON and the tests follow. A key is a
dotted path into one bench's report (``"ratios.seal_vs_floor"``); a goal of ``None`` marks a figure that
is reported for context (a competitor's number, a claim from a paper) without a pass/fail.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "<": operator.lt,
    ">": operator.gt,
    "==": operator.eq,
}


@dataclass(frozen=True)
class Goal:
    """One row of the report: which figure, compared how, against which baseline, from which issue."""

    figure: str  # what a reader sees in the table
    bench: str  # the bench whose report holds the keys
    key: str  # dotted path of the figure the goal is checked on
    op: str | None  # one of _OPS, or None when the figure has no goal
    value: float | None
    issue: int
    baseline: str = ""  # who or what we are compared with, in words
    baseline_key: str | None = None  # dotted path of the baseline's own figure, when the bench has one
    ratio_key: str | None = None  # dotted path of ours-vs-baseline, when the bench has one
    ours_key: str | None = None  # dotted path of our own figure when ``key`` is a ratio

    def goal_text(self) -> str:
        """The goal as a reader writes it: ``≤ 1.3``."""
        if self.op is None or self.value is None:
            return "—"
        sign = {"<=": "≤", ">=": "≥", "==": "="}.get(self.op, self.op)
        return f"{sign} {self.value:g}"

    def met(self, figure: float | None) -> bool | None:
        """True/False against the goal; None when there is no goal or no (finite) figure to judge."""
        if self.op is None or self.value is None or figure is None:
            return None
        if isinstance(figure, float) and math.isnan(figure):
            return None
        return bool(_OPS[self.op](float(figure), float(self.value)))


def lookup(report: dict[str, Any], path: str | None) -> Any:
    """The value at ``path`` ("metrics.x") in one bench's report, or None where it is absent."""
    if path is None:
        return None
    node: Any = report
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


GOALS: tuple[Goal, ...] = (
    # issue 2: the store against raw file I/O of the same bytes (times: ours / raw, lower is better)
    Goal("store put 64 MB (time vs raw write+fsync)", "store", "ratios.put_64mb_vs_raw", "<=", 1.5, 2,
         "raw os.write + fsync", "metrics.raw_put_64mb_s", "ratios.put_64mb_vs_raw", "metrics.put_64mb_s"),
    Goal("store get 64 MB (time vs raw read)", "store", "ratios.get_64mb_vs_raw", "<=", 1.5, 2,
         "raw whole-file read", "metrics.raw_get_64mb_s", "ratios.get_64mb_vs_raw", "metrics.get_64mb_s"),
    # issue 4: the node runtime against PEFT in the same process
    Goal("activate, 8 resident (ms)", "swap", "metrics.activate_ms_p50", "<=", 0.5, 4,
         "PEFT set_adapter", "metrics.peft_set_adapter_ms_p50", "ratios.peft_set_adapter_vs_activate"),
    Goal("activate, many resident (ms)", "swap", "metrics.activate_ms_p50_256", "<=", 0.5, 4,
         "ours at 8 resident", "metrics.activate_ms_p50", "ratios.activate_256_vs_8"),
    Goal("activate speed-up over PEFT set_adapter (×)", "swap", "ratios.peft_set_adapter_vs_activate", ">=",
         10, 4, "PEFT set_adapter", "metrics.peft_set_adapter_ms_p50", None, "metrics.activate_ms_p50"),
    Goal("cold load speed-up over PEFT load_adapter (×)", "swap", "ratios.peft_load_vs_load", ">=", 3, 4,
         "PEFT load_adapter", "metrics.peft_load_adapter_ms_p50", None, "metrics.cold_load_ms_p50"),
    Goal("cold load vs raw safetensors read (time)", "swap", "ratios.load_vs_raw_read", "<=", 1.5, 4,
         "safetensors.load_file", "metrics.raw_safetensors_read_ms_p50", None, "metrics.cold_load_ms_p50"),
    Goal("mixed batch throughput vs single module", "swap", "ratios.mixed_vs_single_throughput", ">=", 0.9,
         4, "PEFT adapter_names", "ratios.peft_mixed_vs_single_throughput"),
    Goal("TTFT with reused prefix (ms)", "swap", "metrics.ttft_reuse_ms", None, None, 4,
         "prefix recomputed", "metrics.ttft_recompute_ms", "ratios.ttft_recompute_vs_reuse"),
    # issue 5: node-to-node sync and the registry
    Goal("transfer throughput vs raw gRPC (×)", "sync", "ratios.transfer_vs_raw_grpc", ">=", 0.5, 5,
         "raw gRPC stream, no TLS (GB/s)", "metrics.raw_grpc_gbps", None, "metrics.transfer_gbps"),
    Goal("floor: the same stream with mutual TLS alone vs raw (×)", "sync", "ratios.mtls_stream_vs_raw_grpc",
         None, None, 5, "raw gRPC stream, no TLS (s)", "metrics.raw_grpc_median_s", None,
         "metrics.floor_mtls_stream_s"),
    Goal("authorize p99 (ms), 10k cubes / 1k grants", "sync", "metrics.authorize_p99_ms", "<=", 2.0, 5,
         "SQLite commit floor p99", "metrics.sqlite_commit_floor_p99_ms"),
    Goal("registry errors under 200 clients", "sync", "metrics.load_errors", "==", 0, 5),
    # issue 6: editing on the embedded model (fractions 0–1)
    Goal("single edit efficacy", "edit", "metrics.single_efficacy", ">=", 0.95, 6, "ROME on GPT-2 XL: 1.00"),
    Goal("single edit generalization", "edit", "metrics.single_generalization", ">=", 0.85, 6,
         "ROME on GPT-2 XL: 0.964"),
    Goal("single edit locality", "edit", "metrics.single_locality", ">=", 0.95, 6, "ROME on GPT-2 XL: 0.754"),
    Goal("1,000 sequential edits: reliability", "edit", "metrics.seq1000_reliability", ">=", 0.90, 6,
         "GRACE .93, WISE .77 (LLaMA-2-7B)"),
    Goal("1,000 sequential edits: generalization", "edit", "metrics.seq1000_generalization", ">=", 0.60, 6,
         "GRACE .08, WISE .72 (LLaMA-2-7B)"),
    Goal("1,000 sequential edits: locality", "edit", "metrics.seq1000_locality", ">=", 0.95, 6,
         "GRACE 1.00, WISE 1.00 (LLaMA-2-7B)"),
    # issue 7: memory conversion; the issue names comparisons, not thresholds
    Goal("answer accuracy with the module", "internalize", "metrics.accuracy_module", None, None, 7,
         "retrieval in prompt (RAG)", "metrics.accuracy_rag", "ratios.accuracy_module_vs_rag"),
    Goal("answer accuracy, bare model", "internalize", "metrics.accuracy_none", None, None, 7),
    Goal("latency reduction vs RAG at 4k tokens", "internalize", "metrics.latency_reduction_4k", None, None,
         7, "MemOS claims 0.6–0.8"),
    Goal("round-trip fact recovery", "internalize", "metrics.roundtrip_recovery", None, None, 7),
    # issue 8: federated shared modules
    Goal("aggregation error, exact stacking", "fed", "metrics.agg_error_exact", "<=", 1e-6, 8,
         "FedIT (A and B averaged apart)", "metrics.agg_error_fedit"),
    Goal("round overhead vs Flower FedAvg (time)", "fed", "ratios.round_overhead_vs_flower_fedavg", "<=",
         1.2, 8, "Flower FedAvg round (s)", "baseline.round_s", None, "metrics.round_s"),
    Goal("accuracy on the union of facts, exact", "fed", "metrics.acc_exact", None, None, 8,
         "FedIT", "metrics.acc_fedit", "ratios.acc_exact_vs_fedit"),
    # issue 11: sealing against straight-line floors, and the watermark
    Goal("seal 256 MB (time vs floor)", "seal", "ratios.seal_vs_floor", "<=", 1.3, 11,
         "AES-256-GCM floor (GB/s)", "metrics.seal_floor_gbps_256mb", None, "metrics.seal_gbps_256mb"),
    Goal("open 256 MB (time vs floor)", "seal", "ratios.open_vs_floor", "<=", 1.3, 11,
         "decrypt + hash floor (GB/s)", "metrics.open_floor_gbps_256mb", None, "metrics.open_gbps_256mb"),
    Goal("seal 256 MB peak memory above baseline (MB)", "seal", "metrics.seal_256mb_peak_extra_mb", "<=", 64,
         11),
    Goal("watermark z on a marked cube", "watermark", "metrics.z_marked", ">=", 6.0, 11),
    Goal("watermark null max z (wrong keys/recipients)", "watermark", "metrics.null_max_z", "<", 4.0, 11),
    Goal("watermark lowest z after an attack", "watermark", "metrics.z_min_attacked", ">=", 4.0, 11),
    # issue 12: learned, scoped and gradient-free editing, and modules that evolve from feedback (test split)
    Goal("MEND-style editor efficacy", "evolve", "metrics.mend_efficacy", ">=", 0.90, 12,
         "ROME, same cases", "metrics.rome_efficacy"),
    Goal("MEND-style editor generalization", "evolve", "metrics.mend_generalization", ">=", 0.70, 12,
         "ROME, same cases", "metrics.rome_generalization"),
    Goal("MEND-style editor locality", "evolve", "metrics.mend_locality", ">=", 0.95, 12,
         "ROME, same cases", "metrics.rome_locality"),
    Goal("MEND-style editor ms per edit", "evolve", "metrics.mend_ms_per_edit", "<=", 50, 12,
         "ROME s per edit", "metrics.rome_s_per_edit"),
    Goal("scoped editing locality at 1,000 edits", "evolve", "metrics.serac_locality_1000", ">=", 0.99, 12),
    Goal("scoped editing efficacy at 1,000 edits", "evolve", "metrics.serac_efficacy_1000", None, None, 12),
    Goal("gradient-free edit efficacy", "evolve", "metrics.gradfree_efficacy", None, None, 12,
         "ROME, same cases", "metrics.rome_efficacy"),
    Goal("self-evolving accuracy after 5 feedback rounds", "evolve", "metrics.evolve_acc_after", None, None,
         12, "before feedback (goal: +0.10)", "metrics.evolve_acc_before"),
    Goal("self-evolving gain after 5 rounds (points)", "evolve", "metrics.evolve_gain", ">=", 0.10, 12),
    Goal("self-evolving, 20% adversarial: change vs start", "evolve", "metrics.evolve_gain_poisoned", ">=",
         0.0, 12),
)  # fmt: skip
