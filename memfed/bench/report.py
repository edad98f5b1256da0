"""The benchmark report: one ``report.json`` of every bench run, a Markdown table of each figure against its
baseline and goal, and PNG plots of the swept series.

Rendering reads only ``report.json``, so plots and the table can be remade (``memfed bench report --from
DIR``) without re-running benches that take minutes. A bench that failed or was not run leaves its rows
as "not run" and its plot as a labelled placeholder, so a partial run still gives a complete report.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from memfed.bench.goals import GOALS, Goal, lookup

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
# file name -> title; every report has all of them (a placeholder where data is missing).
PLOTS: dict[str, str] = {
    "activation.png": "Activation latency vs resident modules",
    "throughput.png": "Transfer throughput: memfed vs raw gRPC vs raw AES-GCM",
    "watermark.png": "Watermark z-score per attack",
    "edit.png": "Edit metrics vs number of sequential edits",
    "fed.png": "Federated accuracy per round: exact vs FedIT",
}


def _fmt(value: Any) -> str:
    """A figure as the table shows it: 4 significant digits, '—' when missing."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int | float):
        if isinstance(value, float) and math.isnan(value):
            return "nan"
        return f"{value:.4g}"
    return str(value)


def rows(benches: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per goal: our figure, the baseline, the ratio, the goal and whether it was met.

    ``benches`` maps a bench name to its entry in report.json (``{"ok", "report", ...}``); ``met`` is
    None where there is no goal or the bench did not produce the figure.
    """
    out = []
    for g in GOALS:
        entry = benches.get(g.bench) or {}
        rep = entry.get("report") if entry.get("ok") else None
        rep = rep or {}
        figure = lookup(rep, g.key)
        out.append(
            {
                "figure": g.figure,
                "bench": g.bench,
                "key": g.key,
                "issue": g.issue,
                "value": figure,
                "ours": lookup(rep, g.ours_key or g.key),
                "baseline_name": g.baseline,
                "baseline": lookup(rep, g.baseline_key),
                "ratio": lookup(rep, g.ratio_key or (g.key if g.key.startswith("ratios.") else None)),
                "goal": g.goal_text(),
                "met": g.met(figure),
                "run": bool(rep),
            }
        )
    return out


def _met_text(row: dict[str, Any]) -> str:
    if not row["run"]:
        return "not run"
    return {True: "yes", False: "**no**", None: "—"}[row["met"]]


def markdown(report: dict[str, Any]) -> str:
    """The Markdown table (figure | ours | baseline | ratio | goal | met?) plus the plots and failures."""
    lines = [
        "# memfed benchmark report",
        "",
        f"Mode: {'quick (smoke figures, not for reporting)' if report.get('quick') else 'full'}.",
        "A ratio named x_vs_y is x's figure over y's; for times lower is better for memfed.",
        "",
        "| figure | ours | baseline | ratio | goal | met? |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        base = r["baseline_name"]
        if r["baseline"] is not None:
            base = f"{base}: {_fmt(r['baseline'])}" if base else _fmt(r["baseline"])
        lines.append(
            f"| {r['figure']} (#{r['issue']}) | {_fmt(r['ours'])} | {base or '—'} | {_fmt(r['ratio'])} "
            f"| {r['goal']} | {_met_text(r)} |"
        )
    failed = {n: e for n, e in report.get("benches", {}).items() if not e.get("ok")}
    if failed:
        lines += ["", "## Benches that did not finish", ""]
        for name, e in failed.items():
            lines.append(f"- `{name}`: {e.get('error') or 'failed'}")
    lines += ["", "## Plots", ""]
    lines += [f"![{title}]({name})" for name, title in PLOTS.items()]
    return "\n".join(lines) + "\n"


# -- plots ----------------------------------------------------------------------------------------------


def _bench(report: dict[str, Any], name: str) -> dict[str, Any]:
    entry = report.get("benches", {}).get(name) or {}
    return (entry.get("report") or {}) if entry.get("ok") else {}


def _placeholder(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"not measured\n({what})", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _plot_activation(ax: Any, report: dict[str, Any]) -> None:
    swap = _bench(report, "swap")
    s = lookup(swap, "series.activation") or {}
    if s.get("resident") and s.get("activate_ms"):
        ax.plot(s["resident"], s["activate_ms"], "o-", label="memfed activate")
    elif lookup(swap, "metrics.activate_ms_p50") is not None:  # reports from before the series existed
        many = lookup(swap, "metrics.resident_many") or 256
        ax.plot([8, many], [swap["metrics"]["activate_ms_p50"], swap["metrics"]["activate_ms_p50_256"]], "o-",
                label="memfed activate")  # fmt: skip
    else:
        _placeholder(ax, "memfed bench swap")
        return
    peft = lookup(swap, "metrics.peft_set_adapter_ms_p50")
    if peft is not None:
        ax.plot([8], [peft], "s", color="tab:red", label="PEFT set_adapter (8 loaded)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("resident modules")
    ax.set_ylabel("median latency (ms)")
    ax.legend()


def _plot_throughput(ax: Any, report: dict[str, Any]) -> None:
    sync, seal = _bench(report, "sync"), _bench(report, "seal")
    s = lookup(sync, "series.transfer") or {}
    if s.get("size_mb"):
        for key, label, style in (
            ("memfed_gbps", "memfed sync (mTLS, sealed, verified, stored)", "o-"),
            ("raw_grpc_gbps", "raw gRPC stream (no TLS)", "s--"),
            ("aes_gcm_gbps", "raw AES-256-GCM (cipher alone)", "^:"),
        ):
            if s.get(key):
                ax.plot(s["size_mb"], s[key], style, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("payload (MiB)")
        ax.set_ylabel("GB/s (log)")
        ax.legend(fontsize=7)
        return
    bars = [  # reports from before the size sweep existed
        ("memfed sync 64 MB\n(mTLS, sealed)", lookup(sync, "metrics.transfer_gbps")),
        ("raw gRPC 64 MB\n(no TLS)", lookup(sync, "metrics.raw_grpc_gbps")),
        ("memfed seal\n256 MB", lookup(seal, "metrics.seal_gbps_256mb")),
        ("raw AES-GCM seal\nfloor 256 MB", lookup(seal, "metrics.seal_floor_gbps_256mb")),
        ("AES-GCM alone", lookup(seal, "metrics.aes_gcm_gbps")),
    ]
    bars = [(label, v) for label, v in bars if v is not None]
    if not bars:
        _placeholder(ax, "memfed bench sync / seal")
        return
    colors = ["tab:blue" if label.startswith("memfed") else "tab:gray" for label, _ in bars]
    ax.bar([b[0] for b in bars], [b[1] for b in bars], color=colors)
    ax.set_ylabel("GB/s")
    ax.tick_params(axis="x", labelsize=7)


def _plot_watermark(ax: Any, report: dict[str, Any]) -> None:
    wm = _bench(report, "watermark")
    s = lookup(wm, "series.attacks") or {}
    if not s.get("attack"):
        _placeholder(ax, "memfed bench watermark")
        return
    ax.bar(s["attack"], s["z"], label="z, true recipient")
    if s.get("best_wrong_z"):
        ax.plot(s["attack"], s["best_wrong_z"], "kx", label="best wrong recipient")
    threshold = lookup(wm, "metrics.z_threshold") or 4.0
    ax.axhline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold:g}")
    ax.set_ylabel("z-score")
    ax.legend(fontsize=7)


def _plot_edit(ax: Any, report: dict[str, Any]) -> None:
    s = lookup(_bench(report, "edit"), "series.sequential") or {}
    if not s.get("edits"):
        _placeholder(ax, "memfed bench edit")
        return
    for k in ("reliability", "generalization", "locality"):
        if s.get(k):
            ax.plot(s["edits"], s[k], "o-", label=k)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("sequential edits")
    ax.set_ylabel("fraction")
    ax.legend()


def _plot_fed(ax: Any, report: dict[str, Any]) -> None:
    fed = _bench(report, "fed")
    s = lookup(fed, "series.accuracy") or {}
    if not s.get("round"):
        _placeholder(ax, "memfed bench fed")
        return
    for k, label in (("exact", "exact (stacked)"), ("fedit", "FedIT")):
        if s.get(k):
            ax.plot(s["round"], s[k], "o-", label=label)
    base = lookup(fed, "metrics.acc_base_model")
    if base is not None:
        ax.axhline(base, color="gray", linestyle=":", label="base model")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy on the union of facts")
    ax.legend()


_PLOTTERS = {
    "activation.png": _plot_activation,
    "throughput.png": _plot_throughput,
    "watermark.png": _plot_watermark,
    "edit.png": _plot_edit,
    "fed.png": _plot_fed,
}


def plots(report: dict[str, Any], out: Path) -> list[Path]:
    """Write every plot in ``PLOTS`` under ``out``; headless (Agg), so it runs on servers and in CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, title in PLOTS.items():
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
        try:
            _PLOTTERS[name](ax, report)
            ax.set_title(title, fontsize=10)
            fig.tight_layout()
            fig.savefig(out / name, format="png")
        finally:
            plt.close(fig)
        written.append(out / name)
    return written


def assemble(benches: dict[str, dict[str, Any]], *, quick: bool) -> dict[str, Any]:
    """report.json's content from each bench's entry ``{"ok", "seconds", "report" | "error"}``."""
    from memfed.bench.harness import environment

    return {"quick": quick, "env": environment(), "benches": benches, "rows": rows(benches)}


def render(report: dict[str, Any], out: Path) -> list[Path]:
    """Write report.json, report.md and the plots under ``out``; the goal rows are recomputed so a
    report.json from before a goal changed renders against today's goals."""
    out.mkdir(parents=True, exist_ok=True)
    report = {**report, "rows": rows(report.get("benches", {}))}
    (out / REPORT_JSON).write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    (out / REPORT_MD).write_text(markdown(report), encoding="utf-8")
    return [out / REPORT_JSON, out / REPORT_MD, *plots(report, out)]


def render_from(directory: Path) -> list[Path]:
    """Re-render a report from ``directory/report.json`` without running anything."""
    from memfed.errors import NotFoundError

    path = directory / REPORT_JSON
    if not path.is_file():
        raise NotFoundError(f"no {REPORT_JSON} in {directory}", hint="run `memfed bench all --report DIR`")
    return render(json.loads(path.read_text()), directory)


__all__ = ["GOALS", "PLOTS", "Goal", "assemble", "markdown", "render", "render_from", "rows"]
