"""The benchmark report: goal evaluation, the Markdown table and the plots, rendered from a canned
report.json that uses the benches' real key names (so a renamed key breaks here, not in a reader's
report), plus `memfed bench all --only store --quick` end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from memfed.bench.goals import GOALS
from memfed.bench.report import PLOTS, REPORT_JSON, REPORT_MD, render, rows

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _ok(bench: str, metrics: dict[str, Any], ratios: dict[str, Any] | None = None, **extra: Any) -> dict:
    report = {
        "bench": bench,
        "metrics": metrics,
        "ratios": ratios or {},
        "baseline": {},
        "series": {},
        **extra,
    }
    return {"ok": True, "seconds": 1.0, "report": report}


def canned() -> dict[str, Any]:
    """A report.json as `memfed bench all` writes it; internalize failed, so its rows are "not run"."""
    benches = {
        "store": _ok(
            "store",
            {"put_64mb_s": 0.06, "raw_put_64mb_s": 0.05, "get_64mb_s": 0.01, "raw_get_64mb_s": 0.005},
            {"put_64mb_vs_raw": 1.2, "get_64mb_vs_raw": 2.0},  # put met, get not met
        ),
        "seal": _ok(
            "seal",
            {
                "seal_gbps_256mb": 1.5,
                "seal_floor_gbps_256mb": 1.6,
                "open_gbps_256mb": 1.0,
                "open_floor_gbps_256mb": 1.2,
                "aes_gcm_gbps": 10.0,
                "seal_256mb_peak_extra_mb": 1.8,
            },
            {"seal_vs_floor": 1.02, "open_vs_floor": 1.11},
        ),
        "swap": _ok(
            "swap",
            {
                "activate_ms_p50": 0.005,
                "activate_ms_p50_256": 0.009,
                "peft_set_adapter_ms_p50": 6.0,
                "resident_many": 256,
                "cold_load_ms_p50": 3.0,
                "peft_load_adapter_ms_p50": 90.0,
                "raw_safetensors_read_ms_p50": 2.9,
                "ttft_reuse_ms": 246.0,
                "ttft_recompute_ms": 8732.0,
            },
            {
                "peft_set_adapter_vs_activate": 1200.0,
                "activate_256_vs_8": 1.8,
                "peft_load_vs_load": 30.0,
                "load_vs_raw_read": 1.03,
                "mixed_vs_single_throughput": 0.97,
                "peft_mixed_vs_single_throughput": 0.9,
                "ttft_recompute_vs_reuse": 35.5,
            },
            series={
                "activation": {
                    "resident": [8, 16, 32, 64, 128, 256],
                    "activate_ms": [0.005, 0.005, 0.006, 0.007, 0.008, 0.009],
                }
            },
        ),
        "sync": _ok(
            "sync",
            {
                "transfer_gbps": 0.5,
                "raw_grpc_gbps": 0.8,
                "authorize_p99_ms": 1.5,
                "sqlite_commit_floor_p99_ms": 1.0,
                "load_errors": 0.0,
            },
            {"transfer_vs_raw_grpc": 0.62},
        ),
        "watermark": _ok(
            "watermark",
            {"z_marked": 10.7, "null_max_z": 3.2, "z_min_attacked": 7.5, "z_threshold": 4.0},
            series={
                "attacks": {
                    "attack": ["fp16", "bf16", "int8", "prune30", "noise10", "merge05", "train50"],
                    "z": [10.7, 10.7, 10.7, 10.7, 10.2, 7.5, 9.0],
                    "best_wrong_z": [2.1, 2.0, 2.2, 2.4, 2.3, 2.5, 2.6],
                }
            },
        ),
        "edit": _ok(
            "edit",
            {
                "single_efficacy": 1.0,
                "single_generalization": 0.9,
                "single_locality": 0.97,
                "seq1000_reliability": 0.95,
                "seq1000_generalization": 0.5,
                "seq1000_locality": 0.99,
            },
            series={
                "sequential": {
                    "edits": [100, 500, 1000],
                    "reliability": [1.0, 0.97, 0.95],
                    "generalization": [0.6, 0.55, 0.5],
                    "locality": [1.0, 0.99, 0.99],
                }
            },
        ),
        "internalize": {"ok": False, "seconds": 3.0, "error": "exit 1: RuntimeError: boom"},
        "fed": _ok(
            "fed",
            {
                "agg_error_exact": 1e-8,
                "agg_error_fedit": 0.4,
                "round_s": 2.2,
                "acc_exact": 0.6,
                "acc_fedit": 0.4,
                "acc_base_model": 0.1,
            },
            {"round_overhead_vs_flower_fedavg": 1.1, "acc_exact_vs_fedit": 1.5},
            series={"accuracy": {"round": [1, 2, 3], "exact": [0.3, 0.5, 0.6], "fedit": [0.2, 0.3, 0.4]}},
        ),
    }
    benches["fed"]["report"]["baseline"] = {"round_s": 2.0}
    return {"quick": True, "env": {"cpus": 2}, "benches": benches}


def _row(table: list[dict[str, Any]], key: str) -> dict[str, Any]:
    return next(r for r in table if r["key"] == key)


def test_goals_are_judged_against_the_canned_figures() -> None:
    table = rows(canned()["benches"])
    assert len(table) == len(GOALS)
    assert _row(table, "ratios.put_64mb_vs_raw")["met"] is True
    assert _row(table, "ratios.get_64mb_vs_raw")["met"] is False
    assert _row(table, "metrics.load_errors")["met"] is True
    assert _row(table, "metrics.seq1000_generalization")["met"] is False
    assert _row(table, "metrics.agg_error_exact")["met"] is True
    assert _row(table, "metrics.null_max_z")["met"] is True
    act = _row(table, "metrics.activate_ms_p50")
    assert (act["baseline"], act["ratio"]) == (6.0, 1200.0)
    # no goal: reported, not judged; a failed bench: not run
    assert _row(table, "metrics.ttft_reuse_ms")["met"] is None
    internalize = [r for r in table if r["bench"] == "internalize"]
    assert internalize and all(not r["run"] and r["met"] is None for r in internalize)


def _check_rendered(out: Path) -> None:
    md = (out / REPORT_MD).read_text()
    assert "| figure | ours | baseline | ratio | goal | met? |" in md
    table_lines = [ln for ln in md.splitlines() if ln.startswith("| ") and "(#" in ln]
    assert len(table_lines) == len(GOALS)
    put = next(ln for ln in table_lines if ln.startswith("| store put 64 MB"))
    assert put.endswith("| ≤ 1.5 | yes |") and "| 1.2 |" in put
    get = next(ln for ln in table_lines if ln.startswith("| store get 64 MB"))
    assert get.endswith("| ≤ 1.5 | **no** |")
    assert next(ln for ln in table_lines if ln.startswith("| round-trip fact recovery")).endswith(
        "| not run |"
    )
    assert "`internalize`: exit 1: RuntimeError: boom" in md
    for name in PLOTS:
        assert f"]({name})" in md
        data = (out / name).read_bytes()
        assert len(data) > 1000 and data[:8] == PNG_MAGIC, name


def test_render_writes_table_json_and_valid_pngs(tmp_path: Path) -> None:
    written = render(canned(), tmp_path)
    assert {p.name for p in written} == {REPORT_JSON, REPORT_MD, *PLOTS}
    _check_rendered(tmp_path)
    assert json.loads((tmp_path / REPORT_JSON).read_text())["rows"]


def test_report_from_rerenders_without_running(tmp_path: Path) -> None:
    (tmp_path / REPORT_JSON).write_text(json.dumps(canned()))
    proc = subprocess.run(
        [sys.executable, "-m", "memfed.cli.main", "bench", "report", "--from", str(tmp_path), "--json"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["files"]) == 2 + len(PLOTS)
    _check_rendered(tmp_path)


def test_plots_are_placeholders_when_nothing_ran(tmp_path: Path) -> None:
    render({"quick": True, "benches": {}}, tmp_path)
    md = (tmp_path / REPORT_MD).read_text()
    assert md.count("| not run |") == len(GOALS)
    for name in PLOTS:
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC


def test_bench_all_only_store_quick_end_to_end(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "memfed.cli.main", "bench", "all", "--only", "store", "--quick",
         "--report", str(tmp_path), "--json"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["benches"] == {"store": True}
    report = json.loads((tmp_path / REPORT_JSON).read_text())
    assert set(report["benches"]) == {"store"}
    store = report["benches"]["store"]["report"]
    assert {"put_64mb_vs_raw", "get_64mb_vs_raw"} <= set(store["ratios"]) and "series" in store
    assert all((tmp_path / name).read_bytes()[:8] == PNG_MAGIC for name in PLOTS)


@pytest.mark.parametrize("bad", ["nope"])
def test_bench_all_refuses_unknown_names(tmp_path: Path, bad: str) -> None:
    from memfed.bench.all import ordered
    from memfed.errors import NotFoundError

    with pytest.raises(NotFoundError):
        ordered([bad])
    assert ordered(["store", "seal"]) == ["store", "seal"]
