"""The CLI as a user meets it: help, --json documents, and exit codes that mean something."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoraConfig, get_peft_model

from memfed.cli.main import main
from memfed.node.models import load_host_model, save_tiny_model_dir


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model_dir("llama", tmp_path_factory.mktemp("model") / "tiny-llama")


def _adapter(model_dir: Path, out: Path, config) -> Path:
    base, _ = load_host_model(model_dir)
    torch.manual_seed(0)
    get_peft_model(copy.deepcopy(base), config).save_pretrained(out)
    return out


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_teaches_and_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "--help")
    assert code == 0
    assert "import-peft" in out and "Exit codes" in out
    code, out, _ = _run(capsys, "cube", "import-peft", "--help")
    assert code == 0 and "adapter_config.json" in out


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "cube", "no-such-command")
    assert code == 2 and "No such command" in err


def test_import_list_show_export(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    adapter = _adapter(
        tiny_model_dir, tmp_path / "legal", LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    store = str(tmp_path / "store")
    code, out, _ = _run(
        capsys,
        "cube",
        "import-peft",
        str(adapter),
        "--model",
        str(tiny_model_dir),
        "--store",
        store,
        "--cube-id",
        "param_legal_expert",
        "--version",
        "2.3.0",
        "--json",
    )
    assert code == 0
    imported = json.loads(out)
    assert imported["cube_id"] == "param_legal_expert" and imported["version"] == "2.3.0"

    code, out, _ = _run(capsys, "cube", "list", "--store", store, "--json")
    assert code == 0 and [c["cube_id"] for c in json.loads(out)["cubes"]] == ["param_legal_expert"]

    code, out, _ = _run(capsys, "cube", "show", "param_legal_expert", "--store", store, "--json")
    assert code == 0 and json.loads(out)["digest"] == imported["digest"]

    target = tmp_path / "exported"
    code, out, _ = _run(
        capsys, "cube", "export-peft", "param_legal_expert@2.3.0", str(target), "--store", store, "--json"
    )
    assert code == 0 and Path(json.loads(out)["path"]) == target
    assert (target / "adapter_model.safetensors").is_file()
    # A second export into the same folder would overwrite: refused with "already exists".
    code, _, err = _run(capsys, "cube", "export-peft", "param_legal_expert", str(target), "--store", store)
    assert code == 5 and "--force" in err


def test_error_exit_codes(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    store = str(tmp_path / "store")
    code, out, err = _run(capsys, "cube", "show", "nothing_here", "--store", store, "--json")
    assert code == 4 and json.loads(out)["error"]["type"] == "NotFoundError" and "error:" in err

    code, _, _ = _run(capsys, "cube", "show", "bad id!", "--store", store)
    assert code == 3

    code, _, _ = _run(
        capsys,
        "cube",
        "import-peft",
        str(tmp_path / "missing"),
        "--model",
        str(tiny_model_dir),
        "--store",
        store,
    )
    assert code == 4

    ia3 = _adapter(
        tiny_model_dir,
        tmp_path / "ia3",
        IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
    )
    code, _, err = _run(
        capsys, "cube", "import-peft", str(ia3), "--model", str(tiny_model_dir), "--store", store
    )
    assert code == 8 and "unsupported" in err

    code, _, _ = _run(capsys, "model", "info", "--model", str(tmp_path / "no-model"))
    assert code == 4


def test_model_init_with_a_local_model_reports_its_path(tiny_model_dir: Path, capsys) -> None:
    code, out, _ = _run(capsys, "model", "init", "--model", str(tiny_model_dir), "--json")
    assert code == 0 and json.loads(out)["path"] == str(tiny_model_dir)


def test_console_script_exit_code_and_one_line_reason(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "memfed.cli.main", "cube", "show", "absent", "--store", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 4
    assert proc.stderr.strip().count("\n") == 0 and "absent" in proc.stderr


def test_bench_store_quick_prints_the_report_keys(capsys) -> None:
    code, out, _ = _run(capsys, "bench", "store", "--quick", "--json")
    report = json.loads(out)
    assert code == 0 and report["bench"] == "store"
    assert {"put_64mb_vs_raw", "get_64mb_vs_raw"} <= set(report["ratios"])
    assert report["baseline"] and report["env"]["cpus"] >= 1
