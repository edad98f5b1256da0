"""PKI and the registry's command line: `memfed pki init/issue` (real x509, files 0600), `memfed
registry serve` as a process with mutual TLS, registration and grants from the CLI, `memfed audit
verify` catching a tampered log, and the rule that the registry never imports torch."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from sqlalchemy import update

from memfed.cli.main import main
from memfed.errors import AlreadyExistsError, NotFoundError
from memfed.registry import db, pki
from memfed.registry.core import Registry


def _json(capsys: pytest.CaptureFixture[str]) -> dict:
    return json.loads(capsys.readouterr().out)


def test_pki_init_and_issue(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "pki"
    assert main(["pki", "init", "--dir", str(d), "--json"]) == 0
    out = _json(capsys)
    assert oct(Path(out["ca_key"]).stat().st_mode & 0o777) == "0o600"
    assert main(["pki", "init", "--dir", str(d)]) == AlreadyExistsError.exit_code
    assert (
        main(
            ["pki", "issue", "node-a", "--dir", str(d), "--host", "10.0.0.7", "--host", "a.example", "--json"]
        )
        == 0
    )
    info = _json(capsys)
    assert oct(Path(info["key"]).stat().st_mode & 0o777) == "0o600"
    cert = x509.load_pem_x509_certificate(Path(info["cert"]).read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert ipaddress.ip_address("10.0.0.7") in san.get_values_for_type(x509.IPAddress)
    assert {"node-a", "localhost", "a.example"} <= set(san.get_values_for_type(x509.DNSName))
    assert pki.cert_common_name(Path(info["cert"]).read_bytes()) == "node-a"
    pki.verify_issued_by(Path(info["cert"]).read_bytes(), (d / "ca.pem").read_bytes())
    assert main(["pki", "issue", "node-a", "--dir", str(d)]) == AlreadyExistsError.exit_code
    assert main(["pki", "issue", "bad name!", "--dir", str(d)]) == 3
    assert main(["pki", "issue", "x", "--dir", str(tmp_path / "none")]) == NotFoundError.exit_code


def test_registry_process_cli_and_audit_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "pki"
    pki.init_ca(d)
    for name in ("registry", "node-a", "admin"):
        pki.issue(d, name)
    main(["identity", "init", "--dir", str(tmp_path / "id-a"), "--name", "node-a"])
    capsys.readouterr()
    reg_dir = tmp_path / "reg"
    port_file = tmp_path / "port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "memfed.cli.main", "registry", "serve", "--dir", str(reg_dir), "--tls",
         str(d / "registry"), "--port", "0", "--port-file", str(port_file), "--operator", "admin"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        end = time.monotonic() + 60
        while not port_file.exists():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < end
            time.sleep(0.1)
        addr = f"127.0.0.1:{port_file.read_text()}"
        common = ["--registry", addr]
        assert main(["registry", "register", *common, "--tls", str(d / "node-a"), "--identity",
                     str(tmp_path / "id-a"), "--address", "127.0.0.1:7711", "--json"]) == 0  # fmt: skip
        assert _json(capsys) == {"node_id": "node-a", "created": True}
        # an unknown cube: node-a is no admin of it, so its grant is refused and audited
        code = main(["registry", "grant", *common, "--tls", str(d / "node-a"), "ghost", "node:b", "read"])
        assert code == 11
        assert main(["registry", "grant", *common, "--tls", str(d / "admin"), "ghost", "node:b", "read"]) == 0
        # publish from node-a's store: node-a then owns the cube and may grant on it
        from memfed.cube.digest import payload_digest
        from memfed.cube.manifest import new_manifest
        from memfed.node.store import CubeStore

        m = new_manifest(cube_id="notes", version="1.0.0", kind="plaintext", digest=payload_digest(b"hi"),
                         size_bytes=2, owner="node-a")  # fmt: skip
        with CubeStore(tmp_path / "store-a") as store:
            store.put(m, b"hi")
        capsys.readouterr()
        publish = ["registry", "publish", *common, "--tls", str(d / "node-a"), "notes", "--identity",
                   str(tmp_path / "id-a"), "--store", str(tmp_path / "store-a"), "--json"]  # fmt: skip
        assert main(publish) == 0
        assert _json(capsys)["catalog_sequence"] == 1
        assert (
            main(["registry", "grant", *common, "--tls", str(d / "node-a"), "notes", "node:b", "read"]) == 0
        )
        assert main(["registry", "grant", *common, "ghost", "node:b", "read"]) == 3  # no --tls, no --insecure
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    err = proc.stderr.read().decode() if proc.stderr else ""
    assert proc.returncode == 0, err
    capsys.readouterr()
    assert main(["registry", "group-add", "--dir", str(reg_dir), "legal_team", "user:alice", "--json"]) == 0
    assert _json(capsys)["groups"] == ["group:legal_team"]
    assert main(["audit", "verify", "--dir", str(reg_dir), "--json"]) == 0
    assert _json(capsys)["ok"] is True
    reg = Registry.open(reg_dir)
    with reg.engine.begin() as conn:
        conn.execute(update(db.audit).where(db.audit.c.sequence == 2).values(reason="nothing to see"))
    reg.close()
    assert main(["audit", "verify", "--dir", str(reg_dir), "--json"]) == 6
    report = json.loads(capsys.readouterr().out.split("\n}\n")[0] + "\n}")
    assert report["ok"] is False and report["bad_sequence"] == 2


def test_insecure_registry_is_explicit_and_warned(tmp_path: Path) -> None:
    assert main(["registry", "serve", "--dir", str(tmp_path / "r"), "--port", "0"]) == 3


def test_registry_and_crypto_import_without_torch() -> None:
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith(("torch.", "transformers", "peft")):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, Block())
import memfed.registry.core, memfed.registry.service, memfed.registry.tls, memfed.registry.pki
import memfed.registry_client, memfed.crypto.signing, memfed.crypto.seal, memfed.cli.registry_cmd
assert "torch" not in sys.modules
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
