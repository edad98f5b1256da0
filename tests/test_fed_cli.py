"""``memfed fed`` as a user meets it: help, init + grant (a local grants file), and refusals with a clear
message and the typed error's exit code, before anything is started. Cheap: no Flower process runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memfed.cli.main import main
from memfed.crypto.identity import init_identity
from memfed.errors import AuthenticationError, InvalidArgumentError, NotFoundError
from memfed.node.tiny_models import save_tiny_model_dir


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_names_every_command_and_option(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "fed", "--help")
    assert code == 0
    for command in ("init", "grant", "serve", "join", "simulate"):
        assert command in out
    code, out, _ = _run(capsys, "fed", "serve", "--help")
    assert code == 0
    for option in ("--registry-dir", "--registry-db", "--grants", "--tls-dir", "--dp-clip", "--dp-noise"):
        assert option in out
    code, out, _ = _run(capsys, "fed", "join", "--help")
    assert code == 0 and "--dp-clip" in out and "--superlink" in out


def test_init_then_grant_admits_the_node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from memfed.fed.authority import LocalAuthority
    from memfed.node.store import CubeStore

    model = save_tiny_model_dir("llama", tmp_path / "model")
    store, grants = tmp_path / "store", tmp_path / "grants.json"
    code, out, err = _run(
        capsys, "fed", "init", "shared_notes", "--store", str(store), "--model", str(model), "--json"
    )
    assert code == 0, err
    assert json.loads(out)["ref"] == "shared_notes@1.0.0"
    with CubeStore(store) as s:
        assert s.versions("shared_notes") == ["1.0.0"]
    init_identity(tmp_path / "alice", name="alice")
    code, out, err = _run(
        capsys, "fed", "grant", "shared_notes", "--grants", str(grants), "--identity", str(tmp_path / "alice")
    )
    assert code == 0, err
    assert "granted use on shared_notes to alice" in out
    authority = LocalAuthority(store, grants)
    assert authority.is_allowed("alice", "shared_notes", "use")
    assert not authority.is_allowed("bob", "shared_notes", "use")
    assert authority.signing_key("alice") is not None


def test_serve_without_admission_source_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(
        capsys, "fed", "serve", "c", "--store", str(tmp_path / "s"), "--tls-dir", str(tmp_path / "ca")
    )
    assert code == InvalidArgumentError.exit_code
    assert "exactly one of --registry-dir and --grants" in err
    assert not (tmp_path / "ca").exists()  # refused before a certificate or a SuperLink was made


def test_grant_of_missing_identity_and_bad_dp_floor(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(
        capsys,
        "fed",
        "grant",
        "c",
        "--grants",
        str(tmp_path / "g.json"),
        "--identity",
        str(tmp_path / "nobody"),
    )
    assert code == NotFoundError.exit_code and "no public identity file" in err
    for p in ("ca.pem", "id", "data"):
        (tmp_path / p).mkdir() if p != "ca.pem" else (tmp_path / p).write_text("x")
    args = [
        "--superlink",
        "127.0.0.1:1",
        "--ca",
        str(tmp_path / "ca.pem"),
        "--identity",
        str(tmp_path / "id"),
    ]
    code, _, err = _run(capsys, "fed", "join", *args, "--data", str(tmp_path / "data"), "--dp-noise", "1")
    assert code == InvalidArgumentError.exit_code and "DP noise needs a clipping norm" in err


def test_init_in_registry_needs_a_registered_aggregator(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = save_tiny_model_dir("llama", tmp_path / "model")
    init_identity(tmp_path / "agg", name="agg")
    args = ["fed", "init", "shared_notes", "--store", str(tmp_path / "store"), "--model", str(model)]
    code, _, err = _run(capsys, *args, "--registry-dir", str(tmp_path / "reg"))
    assert code == InvalidArgumentError.exit_code and "--identity" in err
    code, _, err = _run(
        capsys, *args, "--registry-dir", str(tmp_path / "reg"), "--identity", str(tmp_path / "agg")
    )
    assert code == AuthenticationError.exit_code and "no registered node holds" in err
