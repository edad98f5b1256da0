"""`memfed demo`, the README's main command, end to end on the embedded default model."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from memfed.cli.main import main
from memfed.node.models import save_tiny_model_dir

STEPS = [
    "model", "make_adapter", "import", "export_roundtrip", "hot_swap", "time_machine",
    "foreign_model_refused", "tamper_detected",
]  # fmt: skip


def test_demo_json_reports_every_step_ok_and_cleans_up(default_model_dir: Path, capsys) -> None:
    before = set(Path(tempfile.gettempdir()).glob("memfed-demo-*"))
    code = main(["demo", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    assert [s["name"] for s in report["steps"]] == STEPS
    for step in report["steps"]:
        assert step["ok"], step
        assert step["seconds"] >= 0
    steps = by_name(report)
    assert steps["model"]["path"] == str(default_model_dir)
    assert steps["export_roundtrip"]["max_abs_diff"] <= 1e-6
    assert "Lumora" in steps["make_adapter"]["after"]
    assert set(Path(tempfile.gettempdir()).glob("memfed-demo-*")) == before  # no temp state left


def test_demo_keep_leaves_its_work_dir_and_takes_any_model(tmp_path: Path, capsys) -> None:
    model = save_tiny_model_dir("llama", tmp_path / "tiny")
    main(["demo", "--json", "--keep", "--model", str(model)])
    report = json.loads(capsys.readouterr().out)
    work = Path(report["work_dir"])
    try:
        assert (work / "store" / "index.sqlite").is_file()
        assert by_name(report)["model"]["path"] == str(model)
        assert by_name(report)["tamper_detected"]["ok"]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def by_name(report: dict) -> dict[str, dict]:
    return {s["name"]: s for s in report["steps"]}
