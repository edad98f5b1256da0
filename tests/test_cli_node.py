"""`memfed node serve`, `memfed module ...` and `memfed generate` as a user meets them: a real node process,
one JSON document per --json command, and exit codes that say what went wrong."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from memfed.cli.main import main
from memfed.cube.build import lora_cube
from memfed.node.models import load_host_model
from memfed.node.store import CubeStore
from memfed.node.tiny_models import save_tiny_model_dir


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    code, out, err = _run(capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model_dir("llama", tmp_path_factory.mktemp("model") / "tiny-llama", seed=5)


@pytest.fixture(scope="module")
def local_store(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local store holding cubes made for the tiny model: two versions of one, a second one, a bad one."""
    model, _ = load_host_model(tiny_dir)
    root = tmp_path_factory.mktemp("local-store")

    def lora(cube_id: str, seed: int, version: str = "1.0.0", nan: bool = False):
        g = torch.Generator().manual_seed(seed)
        factors = {
            n: (torch.randn(4, 64, generator=g) * 0.5, torch.randn(64, 4, generator=g) * 0.5)
            for n, _ in model.named_modules()
            if n.endswith(("q_proj", "v_proj"))
        }
        if nan:
            next(iter(factors.values()))[0][0, 0] = float("nan")
        return lora_cube(model, factors, cube_id=cube_id, version=version)

    with CubeStore(root) as store:
        for cube in (
            lora("legal", 1),
            lora("legal", 2, "1.1.0"),
            lora("tax", 3),
            lora("broken", 4, nan=True),
        ):
            store.put(cube.manifest, cube.payload)
    return root


@pytest.fixture(scope="module")
def node_addr(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`memfed node serve` in its own process, on a free loopback port."""
    work = tmp_path_factory.mktemp("node")
    log = open(work / "stderr.log", "w+b")  # noqa: SIM115 (closed below)
    cmd = [
        sys.executable,
        "-m",
        "memfed.cli.main",
        "node",
        "serve",
        "--model",
        str(tiny_dir),
        "--store",
        str(work / "store"),
        "--port",
        "0",
        "--insecure",
        "--json",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=log, env={**os.environ, "MEMFED_HOME": str(work)}
    )
    try:
        lines = []
        while not lines or lines[-1] != "}\n":  # --json: one document, printed once the node listens
            line = proc.stdout.readline().decode()
            if not line:
                log.seek(0)
                pytest.fail(f"memfed node serve exited early: {log.read().decode()[-2000:]}")
            lines.append(line)
        info = json.loads("".join(lines))
        assert info["port"] > 0 and info["store"] == str(work / "store")
        yield info["address"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        log.seek(0)
        stderr = log.read().decode()
        assert "PLAINTEXT" in stderr and "stopping" in stderr  # the plaintext port is logged as a warning
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_help_teaches(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "--help")
    assert code == 0 and all(c in out for c in ("node", "module", "generate")) and "14" in out
    code, out, _ = _run(capsys, "node", "serve", "--help")
    assert code == 0 and "--insecure" in out and "grpcurl" in out and "--tls-ca" in out
    code, out, _ = _run(capsys, "module", "--help")
    assert code == 0 and all(
        c in out for c in ("activate", "evict", "merge", "archive", "restore", "rollback")
    )
    code, out, _ = _run(capsys, "generate", "--help")
    assert code == 0 and "--module" in out and "--base-only" in out


def test_serve_refuses_plaintext_unless_asked(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = _run(capsys, "node", "serve", "--store", str(tmp_path), "--port", "0")
    assert code == 3 and "--insecure" in err
    code, _, err = _run(capsys, "node", "serve", "--store", str(tmp_path), "--tls-cert", "c.pem")
    assert code == 3 and "--tls-key" in err


def test_an_unreachable_node_is_exit_code_14(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "node", "health", "--node", "127.0.0.1:1", "--timeout", "3", "--json")
    assert code == 14 and "memfed node serve" in err
    assert json.loads(out)["error"]["type"] in ("UnavailableError", "DeadlineExceededError")


def test_modules_on_a_running_node(
    capsys: pytest.CaptureFixture[str], node_addr: str, local_store: Path, tmp_path: Path
) -> None:
    node = ("--node", node_addr)
    store = ("--store", str(local_store))
    health = _json(capsys, "node", "health", *node)
    assert health["address"] == node_addr and health["active_modules"] == []
    for ref in ("legal@1.0.0", "legal@1.1.0", "tax"):
        pushed = _json(capsys, "module", "push", ref, *store, *node)
        assert pushed["already_present"] is False
    code, _, err = _run(capsys, "module", "push", "broken", *store, *node)
    assert code == 3 and "NaN or Inf" in err  # refused by the node, nothing stored there
    listed = _json(capsys, "module", "list", *node)["cubes"]
    assert [(c["cube_id"], c["version"]) for c in listed] == [
        ("legal", "1.0.0"),
        ("legal", "1.1.0"),
        ("tax", "1.0.0"),
    ]
    assert _json(capsys, "module", "show", "legal", *node)["version"] == "1.1.0"

    base = _json(capsys, "generate", "hello", "-n", "6", *node)["results"][0]
    assert base["memory_used"] == []
    loaded = _json(capsys, "module", "load", "tax", "--pin", *node)
    assert loaded["ref"] == "tax@1.0.0" and loaded["size_bytes"] > 0
    activated = _json(capsys, "module", "activate", "tax", *node)
    assert activated["active"] == ["tax@1.0.0"]
    out = _json(capsys, "generate", "hello", "hello", "-n", "6", *node)
    assert out["batch_rows"] == 2 and [r["memory_used"] for r in out["results"]] == [["param:tax@1.0.0"]] * 2
    explicit = _json(capsys, "generate", "hello", "-n", "6", "--module", "legal@1.0.0", *node)["results"][0]
    assert explicit["memory_used"] == ["param:legal@1.0.0"]
    bare = _json(capsys, "generate", "hello", "-n", "6", "--base-only", *node)["results"][0]
    assert bare["text"] == base["text"]
    assert _json(capsys, "module", "deactivate", *node)["active"] == []
    assert _json(capsys, "module", "evict", "tax", *node)["now_in"] == "host"

    bound = _json(capsys, "module", "bind", "contract_review", "legal", *node)
    assert bound["bindings"] == ["contract_review=legal"]
    routed = _json(capsys, "generate", "clause", "--task", "contract_review", "-n", "4", *node)["results"][0]
    assert routed["memory_used"] == ["param:legal@1.1.0"]

    merged = _json(
        capsys,
        "module",
        "merge",
        "legal@1.0.0",
        "tax",
        "--into",
        "legal_tax",
        "--weight",
        "1",
        "--weight",
        "0.5",
        *node,
    )
    assert merged["ref"] == "legal_tax@1.0.0" and merged["rank"] == 8  # cat: ranks add up
    back = _json(capsys, "module", "rollback", "legal", "--reason", "1.1.0 regressed", *node)
    assert (back["previous"], back["current"]) == ("legal@1.1.0", "legal@1.0.0")
    code, _, err = _run(capsys, "generate", "x", "--module", "legal@1.1.0", *node)
    assert code == 9 and "restore" in err  # archived by the rollback
    assert _json(capsys, "module", "restore", "legal@1.1.0", *node)["to"] == "activated"
    assert _json(capsys, "module", "archive", "tax", "--reason", "unused", *node)["to"] == "archived"

    pulled = _json(capsys, "module", "pull", "legal_tax", "--store", str(tmp_path / "mine"), *node)
    with CubeStore(tmp_path / "mine") as mine:
        assert mine.get("legal_tax").manifest.digest == pulled["digest"]

    code, out, err = _run(capsys, "generate", "x", "--module", "no_such_module", *node, "--json")
    assert code == 4 and "no_such_module" in err and json.loads(out)["error"]["type"] == "NotFoundError"
    code, _, err = _run(capsys, "module", "bind", "t", *node)
    assert code == 3
    started = time.monotonic()
    code, _, err = _run(capsys, "generate", "a", "-n", "256", "--timeout", "0.05", *node)
    assert code == 14 and time.monotonic() - started < 10
