"""``memfed edit`` as a user meets it, on a tiny random model (the mechanics, not the quality)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memfed.bench.harness import BENCHES
from memfed.cli.main import main
from memfed.node.models import save_tiny_model_dir

PROMPT = "The capital of Veltria is"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model_dir("llama", tmp_path_factory.mktemp("model") / "tiny-llama")


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MEMFED_HOME", str(tmp_path / "home"))  # key statistics are cached here
    return tmp_path / "home"


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_trace_prints_effects_and_writes_a_png(model_dir: Path, tmp_path: Path, capsys) -> None:
    png = tmp_path / "trace.png"
    code, out, _ = _run(
        capsys,
        "edit",
        "trace",
        PROMPT,
        "--subject",
        "Veltria",
        "--samples",
        "2",
        "--png",
        str(png),
        "--model",
        str(model_dir),
        "--json",
    )
    assert code == 0
    data = json.loads(out)
    assert set(data["effects"]) == {"hidden", "mlp", "attn"} and len(data["effects"]["mlp"]) == 2
    assert data["tokens"][data["subject_range"][1]].strip().endswith("a")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, _ = _run(
        capsys, "edit", "trace", PROMPT, "--subject", "Veltria", "--samples", "1", "--model", str(model_dir)
    )
    assert code == 0 and "indirect effect" in out


def test_apply_show_ask_and_versions(model_dir: Path, tmp_path: Path, capsys) -> None:
    store = str(tmp_path / "store")
    common = ("--store", store, "--model", str(model_dir), "--json")
    code, out, err = _run(
        capsys, "edit", "apply", PROMPT, "--subject", "Veltria", "--target", "Quorn", "--layer", "0", *common
    )
    assert code == 0, err
    first = json.loads(out)
    assert first["cube"] == "edits@1.0.0" and first["method"] == "grace" and first["layers"] == "0"
    code, out, _ = _run(
        capsys,
        "edit",
        "apply",
        "In Zembla, people speak",
        "--subject",
        "Zembla",
        "--target",
        "Quornish",
        *common,
    )
    second = json.loads(out)
    assert code == 0 and second["cube"] == "edits@1.1.0" and second["parent"] == "edits@1.0.0"
    code, out, _ = _run(capsys, "edit", "show", "edits", "--store", store, "--json")
    shown = json.loads(out)
    assert code == 0 and shown["form"] == "codebook" and len(shown["changes"]) == 2
    code, out, _ = _run(capsys, "edit", "ask", PROMPT, "--cube", "edits", *common)
    assert code == 0 and json.loads(out)["cubes"] == ["edits@1.1.0"]
    code, out, _ = _run(
        capsys,
        "edit",
        "apply",
        PROMPT,
        "--subject",
        "Veltria",
        "--target",
        "Quorn",
        "--method",
        "rome",
        "--layer",
        "0",
        *common,
    )
    rome = json.loads(out)
    assert code == 0 and rome["cube"] == "edit-Veltria@1.0.0"
    code, out, _ = _run(capsys, "cube", "show", "edit-Veltria", "--store", store, "--json")
    manifest = json.loads(out)
    assert (
        code == 0 and manifest["kind"] == "CUBE_KIND_EDIT" and "Veltria" in manifest["origin"]["description"]
    )


def test_apply_from_file_with_memit(model_dir: Path, tmp_path: Path, capsys) -> None:
    requests = tmp_path / "requests.jsonl"
    requests.write_text(
        json.dumps({"prompt": PROMPT, "subject": "Veltria", "target": "Quorn"})
        + "\n"
        + json.dumps({"prompt": "In Zembla, people speak", "subject": "Zembla", "target": "Quornish"})
        + "\n"
    )
    code, out, err = _run(
        capsys,
        "edit",
        "apply",
        "--from-file",
        str(requests),
        "--method",
        "memit",
        "--layer",
        "0",
        "--store",
        str(tmp_path / "store"),
        "--model",
        str(model_dir),
        "--json",
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["layers"] == "0,1" or report["layers"] == "0"
    assert [c["subject"] for c in report["changes"]] == ["Veltria", "Zembla"]


def test_bad_input_exits_with_clear_errors(model_dir: Path, tmp_path: Path, capsys) -> None:
    common = ("--store", str(tmp_path / "store"), "--model", str(model_dir))
    code, _, err = _run(capsys, "edit", "apply", PROMPT, "--subject", "Zembla", "--target", "Quorn", *common)
    assert code == 3 and "does not occur in the prompt" in err
    code, _, err = _run(
        capsys, "edit", "apply", PROMPT, "--subject", "Veltria", "--target", "Quorn", "--layer", "9", *common
    )
    assert code == 3 and "layers 0..1" in err
    code, _, err = _run(capsys, "edit", "apply", "--subject", "Veltria", *common)
    assert code == 2
    code, out, _ = _run(
        capsys, "edit", "trace", PROMPT, "--subject", "Zembla", "--model", str(model_dir), "--json"
    )
    assert code == 3 and json.loads(out)["error"]["type"] == "InvalidArgumentError"


def test_eval_reads_a_counterfact_file(model_dir: Path, tmp_path: Path, capsys) -> None:
    case = {
        "case_id": "v1",
        "requested_rewrite": {
            "prompt": "The capital of {} is",
            "subject": "Veltria",
            "target_new": {"str": "Quorn"},
            "target_true": {"str": "Dralmouth"},
        },
        "paraphrase_prompts": ["In Veltria, the capital is"],
        "neighborhood_prompts": [{"prompt": "The capital of Zembla is", "target": "Pale"}],
    }
    path = tmp_path / "cases.jsonl"
    path.write_text(json.dumps(case) + "\n")
    code, out, err = _run(
        capsys, "edit", "eval", str(path), "--method", "none", "--model", str(model_dir), "--json"
    )
    assert code == 0, err
    data = json.loads(out)
    assert data["method"] == "none" and data["cases"] == 1.0 and data["locality"] == 1.0
    code, out, _ = _run(
        capsys,
        "edit",
        "eval",
        str(path),
        "--method",
        "grace",
        "--layer",
        "0",
        "--model",
        str(model_dir),
        "--json",
    )
    assert code == 0 and json.loads(out)["edits"] == 1.0


def test_the_edit_bench_is_registered() -> None:
    assert BENCHES["edit"] == "memfed.bench.edit:run"


def test_scoped_and_gradient_free_edits(model_dir: Path, tmp_path: Path, capsys) -> None:
    """`--method serac` grows a scoped edit memory (calibrated on the shipped cases' train split, no
    training) that `edit ask` answers through; `--method gradfree` stores a low-rank edit like ROME's."""
    store = str(tmp_path / "store")
    common = ("--store", store, "--model", str(model_dir), "--json")
    code, out, err = _run(
        capsys, "edit", "apply", PROMPT, "--subject", "Veltria", "--target", "Quorn", "--method", "serac",
        "--cube", "scoped", *common,
    )  # fmt: skip
    assert code == 0, err
    first = json.loads(out)
    assert first["cube"] == "scoped@1.0.0" and first["method"] == "serac" and first["layers"] == ""
    assert first["changes"][0]["answer_after"] == "Quorn"
    code, out, _ = _run(capsys, "edit", "ask", PROMPT, "--cube", "scoped", *common)
    assert code == 0 and json.loads(out)["edited"] == "Quorn"  # (paraphrases: tests/test_edit_scope.py)
    code, out, _ = _run(capsys, "edit", "ask", "The capital of Zembla is", "--cube", "scoped", *common)
    asked = json.loads(out)
    assert code == 0 and asked["edited"] == asked["unedited"]  # another subject: the untouched model
    code, out, _ = _run(capsys, "edit", "show", "scoped", "--store", store, "--json")
    assert code == 0 and json.loads(out)["form"] == "scope"
    code, _, err = _run(  # a scoped memory cannot take a weight edit as its next version
        capsys, "edit", "apply", PROMPT, "--subject", "Veltria", "--target", "Dralmouth", "--method", "rome",
        "--cube", "scoped", *common,
    )  # fmt: skip
    assert code != 0 and "scoped edit memory" in err
    code, out, err = _run(
        capsys, "edit", "apply", PROMPT, "--subject", "Veltria", "--target", "Quorn", "--method", "gradfree",
        "--layer", "0", *common,
    )  # fmt: skip
    assert code == 0, err
    stored = json.loads(out)
    assert stored["method"] == "gradfree" and stored["layers"] == "0"
    code, out, _ = _run(capsys, "edit", "show", stored["cube_id"], "--store", store, "--json")
    assert code == 0 and json.loads(out)["method"] == "gradfree"
