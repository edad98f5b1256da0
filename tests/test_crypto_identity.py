"""Identities (key files, passphrases, public identities) and the identity / export / import CLI."""

from __future__ import annotations

import json
import os
import random
import stat
from pathlib import Path

import pytest

from memfed.cli.main import main
from memfed.crypto.identity import (
    MLKEM_FILE,
    PUBLIC_FILE,
    SIGNING_FILE,
    X25519_FILE,
    KemSuiteName,
    PublicIdentity,
    init_identity,
    load_identity,
    load_public_identity,
)
from memfed.crypto.signing import TrustedKeys, sign_manifest, verify_manifest
from memfed.cube import new_manifest, payload_digest
from memfed.errors import AlreadyExistsError, AuthenticationError, IntegrityError, InvalidArgumentError
from memfed.node.store import CubeStore


def test_key_files_are_0600_and_not_overwritten(tmp_path: Path) -> None:
    d = tmp_path / "id"
    ident = init_identity(d, post_quantum=True)
    for name in (SIGNING_FILE, X25519_FILE, MLKEM_FILE):
        assert stat.S_IMODE(os.stat(d / name).st_mode) == 0o600, name
    assert not [p for p in d.iterdir() if p.name.startswith(".")]  # no temp files left
    before = (d / SIGNING_FILE).read_bytes()
    with pytest.raises(AlreadyExistsError):
        init_identity(d)
    assert (d / SIGNING_FILE).read_bytes() == before
    again = init_identity(d, force=True)
    assert again.key_id != ident.key_id
    assert not (d / MLKEM_FILE).exists()  # forced to a classic identity: the PQ key is gone


def test_passphrase_protects_private_keys(tmp_path: Path) -> None:
    d = tmp_path / "id"
    made = init_identity(d, passphrase=b"correct horse")
    assert b"ENCRYPTED PRIVATE KEY" in (d / SIGNING_FILE).read_bytes()
    with pytest.raises(AuthenticationError):
        load_identity(d)
    with pytest.raises(AuthenticationError):
        load_identity(d, passphrase=b"wrong")
    assert load_identity(d, passphrase=b"correct horse").key_id == made.key_id


def test_public_identity_round_trip_and_tamper(tmp_path: Path) -> None:
    ident = init_identity(tmp_path / "id", post_quantum=True)
    pub = load_public_identity(tmp_path / "id" / PUBLIC_FILE)
    assert pub.suite is KemSuiteName.MLKEM768_X25519
    assert pub.recipient_id == ident.recipient_id and pub.key_id == ident.key_id
    assert len(pub.fingerprint) == 19 and pub.fingerprint.count("-") == 3
    d = pub.to_dict()
    other = init_identity(tmp_path / "other").public.to_dict()
    d["x25519_public"] = other["x25519_public"]  # swap in someone else's key, keep the stated id
    with pytest.raises(InvalidArgumentError):
        PublicIdentity.from_dict(d)


def test_signature_covers_exact_bytes(tmp_path: Path) -> None:
    ident = init_identity(tmp_path / "id")
    m = new_manifest(
        cube_id="c", version="1.0.0", kind="plaintext", digest=payload_digest(b"x"), size_bytes=1
    )
    signed = sign_manifest(m, ident)
    assert signed.key_id == ident.key_id and signed.algorithm == "ed25519"
    assert verify_manifest(signed, TrustedKeys([ident.public])) == m
    signed.manifest = signed.manifest.replace(b"1.0.0", b"1.0.1")
    with pytest.raises(IntegrityError):
        verify_manifest(signed, TrustedKeys([ident.public]))


def test_cli_identity_export_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # type: ignore[no-untyped-def]
    home = tmp_path / "home"
    monkeypatch.setenv("MEMFED_HOME", str(home))
    monkeypatch.setenv("BOB_PASS", "s3cret")
    alice, bob = tmp_path / "alice", tmp_path / "bob"
    assert main(["identity", "init", "--dir", str(alice), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fingerprint"] and out["kem_suite"] == KemSuiteName.X25519.value
    assert main(["identity", "init", "--dir", str(alice)]) == 5  # AlreadyExistsError
    capsys.readouterr()
    assert (
        main(["identity", "init", "--dir", str(bob), "--pq", "--passphrase-env", "BOB_PASS", "--json"]) == 0
    )
    capsys.readouterr()
    assert main(["identity", "show", "--dir", str(bob), "-o", str(tmp_path / "bob.pub.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kem_suite"] == KemSuiteName.MLKEM768_X25519.value

    payload = random.Random(1).randbytes(300_000)
    m = new_manifest(
        cube_id="notes",
        version="1.0.0",
        kind="plaintext",
        digest=payload_digest(payload),
        size_bytes=len(payload),
    )
    with CubeStore(tmp_path / "store_a") as sa:
        sa.put(m, payload)
    mcube = tmp_path / "notes.mcube"
    args = ["cube", "export", "notes", "--to", str(tmp_path / "bob.pub.json"), "-o", str(mcube)]
    assert main([*args, "--dir", str(alice), "--store", str(tmp_path / "store_a"), "--json"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["watermarked"] is False and mcube.exists()

    imp = ["cube", "import", str(mcube), "--dir", str(bob), "--store", str(tmp_path / "store_b"), "--json"]
    # Without trusting alice: unauthenticated (12), nothing stored.
    assert main([*imp, "--passphrase-env", "BOB_PASS"]) == 12
    capsys.readouterr()
    with CubeStore(tmp_path / "store_b") as sb:
        assert sb.list() == []
    # Without the passphrase: refused (12) before anything else.
    assert main([*imp, "--trust", str(alice / PUBLIC_FILE)]) == 12
    capsys.readouterr()
    assert main([*imp, "--trust", str(alice / PUBLIC_FILE), "--passphrase-env", "BOB_PASS"]) == 0
    assert json.loads(capsys.readouterr().out)["digest"] == m.digest
    with CubeStore(tmp_path / "store_b") as sb:
        assert sb.get("notes").payload == payload
    # Alice cannot open what was sealed for bob only: permission denied (11).
    assert main(["cube", "import", str(mcube), "--dir", str(alice), "--store", str(tmp_path / "s_c")]) == 11
