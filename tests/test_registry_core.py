"""The registry facade on both backends: registration, catalog integrity (rollback, mix-and-match,
freeze), deny-by-default access control with groups and expiry, capability tokens checked offline, and
the hash-chained audit log that shows an edited or deleted entry."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from registry_support import Party, db_url, make_party  # noqa: F401  (db_url is a fixture)
from sqlalchemy import delete, update

from memfed.errors import (
    AuthenticationError,
    IntegrityError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    RollbackError,
)
from memfed.mip.v1 import registry_service_pb2 as rpb
from memfed.registry import db, pki
from memfed.registry.catalog import verify_answer
from memfed.registry.core import Registry
from memfed.registry.tokens import TokenVerifier


@pytest.fixture
def net(tmp_path: Path) -> dict[str, Party]:
    pki_dir = tmp_path / "pki"
    pki.init_ca(pki_dir)
    return {n: make_party(pki_dir, n) for n in ("node-a", "node-b", "node-c")}


@pytest.fixture
def reg(tmp_path: Path, db_url: str | None, net: dict[str, Party]):  # noqa: F811
    ca = (tmp_path / "pki" / "ca.pem").read_bytes()
    r = Registry.open(tmp_path / "registry", db_url=db_url, ca_pem=ca)
    for p in net.values():
        r.register_node(p.message())
    yield r
    r.close()


def _state(r: Registry) -> tuple:
    with r.engine.connect() as c:
        return tuple(
            sorted(tuple(row) for row in c.execute(t.select()))
            for t in (db.nodes, db.cube_versions, db.holders, db.grants, db.tokens)
        )


def test_register_is_idempotent_and_pins_the_identity(reg: Registry, net: dict[str, Party], tmp_path: Path):
    a = net["node-a"]
    assert reg.register_node(a.message()) is False
    before = _state(reg)
    other = make_party(tmp_path / "pki", "node-x")
    forged = a.message()
    forged.certificate_pem = other.cert.cert.read_bytes()  # another node's certificate under node-a's id
    with pytest.raises(AuthenticationError, match="issued to 'node-x'"):
        reg.register_node(forged)
    stranger_ca = tmp_path / "other-pki"
    pki.init_ca(stranger_ca)
    rogue = make_party(stranger_ca, "node-r")
    with pytest.raises(AuthenticationError, match="not issued by this network"):
        reg.register_node(rogue.message())
    with pytest.raises(InvalidArgumentError):
        reg.register_node(rpb.NodeIdentity(node_id="node-z"))
    assert _state(reg) == before
    last = reg.audit_entries()[-1]
    assert last.allowed is False and last.action == "register"


def test_certificate_rotation_keeps_keys_and_retires_the_old_certificate(
    reg: Registry, net: dict[str, Party], tmp_path: Path
):
    a = net["node-a"]
    old_fp = pki.cert_fingerprint(a.cert.cert.read_bytes())
    new_cert = pki.issue(tmp_path / "pki", "node-a", out_dir=tmp_path / "rotated")
    new_fp = pki.cert_fingerprint(new_cert.cert.read_bytes())
    assert new_fp != old_fp
    rotated = a.message()
    rotated.certificate_pem = new_cert.cert.read_bytes()
    before = _state(reg)
    # Over a channel made with someone else's certificate: refused, nothing changes.
    other_fp = pki.cert_fingerprint(net["node-b"].cert.cert.read_bytes())
    with pytest.raises(AuthenticationError, match="currently registered certificate"):
        reg.rotate_certificate(rotated, peer_fingerprint=other_fp)
    # New identity keys under the old id: a new node, not a rotation.
    swapped = net["node-b"].message()
    swapped.node_id, swapped.certificate_pem = "node-a", new_cert.cert.read_bytes()
    with pytest.raises(PermissionDeniedError, match="other identity keys"):
        reg.rotate_certificate(swapped, peer_fingerprint=old_fp)
    with pytest.raises(NotFoundError):
        reg.rotate_certificate(make_party(tmp_path / "pki", "node-q").message())
    assert _state(reg) == before
    assert reg.rotate_certificate(rotated, peer_fingerprint=old_fp) is True
    assert reg.rotate_certificate(rotated, peer_fingerprint=new_fp) is False  # idempotent
    assert reg.principal_for_certificate("node-a", new_fp) == "node:node-a"
    with pytest.raises(AuthenticationError, match="not the one"):
        reg.principal_for_certificate("node-a", old_fp)
    assert reg.node("node-a").certificate_pem == new_cert.cert.read_bytes()
    rotations = [e for e in reg.audit_entries() if e.action == "rotate"]
    assert [e.allowed for e in rotations] == [False, False, False, True, True]
    assert reg.verify_audit().ok


def test_deny_by_default_grants_groups_and_expiry(reg: Registry, net: dict[str, Party]):
    a = net["node-a"]
    reg.publish(a.manifest("legal_expert", "1.0.0"), "node-a")
    assert reg.is_allowed("node-a", "legal_expert", "export")  # the first publisher owns it (admin)
    assert not reg.is_allowed("node-b", "legal_expert", "read")
    reg.grant("legal_expert", "group:legal_team", ["use"], by="node:node-a")
    reg.add_to_group("legal_team", "user:alice")
    assert reg.is_allowed("user:alice", "legal_expert", "use")
    assert not reg.is_allowed("user:alice", "legal_expert", "export")
    reg.grant("legal_expert", "node-b", ["read"], expires_at=time.time() + 0.3)
    assert reg.is_allowed("node-b", "legal_expert", "read")
    time.sleep(0.4)
    assert not reg.is_allowed("node-b", "legal_expert", "read")
    with pytest.raises(PermissionDeniedError, match=r"not an admin|needs admin"):
        reg.grant("legal_expert", "node-c", ["read"], by="node-b")
    with pytest.raises(InvalidArgumentError, match="unknown action"):
        reg.grant("legal_expert", "node-c", ["steal"])
    with pytest.raises(InvalidArgumentError):
        reg.grant("legal_expert", "robot:x", ["read"])
    decisions = [(e.principal, e.action, e.allowed) for e in reg.audit_entries()]
    assert ("node:node-b", "read", False) in decisions and ("user:alice", "use", True) in decisions
    assert ("node:node-b", "grant", False) in decisions


def test_catalog_rollback_mix_and_match_and_freeze(reg: Registry, net: dict[str, Party]):
    a, c = net["node-a"], net["node-c"]
    v1 = a.manifest("shared", "1.0.0")
    reg.publish(v1, "node-a")
    d1 = _digest(v1)
    v2 = a.manifest("shared", "1.1.0", chain=(d1,))
    reg.publish(v2, "node-a")
    before = _state(reg)
    with pytest.raises(RollbackError, match="versions only go forward"):
        reg.publish(a.manifest("shared", "1.0.5", chain=(d1,)), "node-a")
    with pytest.raises(IntegrityError, match="version chain"):
        reg.publish(a.manifest("shared", "2.0.0", chain=("sha256:" + "0" * 64,)), "node-a")
    with pytest.raises(IntegrityError, match="published already"):
        reg.publish(a.manifest("shared", "1.1.0", chain=(d1,)), "node-a")
    with pytest.raises(PermissionDeniedError):
        reg.publish(c.manifest("shared", "3.0.0", chain=(d1, _digest(v2))), "node-c")
    with pytest.raises(NotFoundError):
        reg.publish(a.manifest("fresh", "1.0.0"), "node-nobody")
    tampered = a.manifest("shared", "9.0.0")
    tampered.signature = bytes(64)
    with pytest.raises(IntegrityError):
        reg.publish(tampered, "node-a")
    assert _state(reg) == before
    signed = reg.lookup("shared")
    answer = verify_answer(signed, reg.public_key, cube_id="shared")
    assert [e.holders for e in answer.versions] == [["node-a"], ["node-a"]]
    with pytest.raises(RollbackError, match="stale"):
        verify_answer(signed, reg.public_key, now=time.time() + reg.answer_ttl_s + 1)
    with pytest.raises(RollbackError, match="older"):
        verify_answer(signed, reg.public_key, min_sequence=answer.sequence + 1)
    signed.answer = signed.answer + b"\x00"
    with pytest.raises(AuthenticationError):
        verify_answer(signed, reg.public_key)
    assert [n.node_id for n in reg.who_holds(d1)] == ["node-a"]


def _digest(signed) -> str:
    from memfed.cube.manifest import manifest_from_bytes

    return manifest_from_bytes(signed.manifest).digest


def test_tokens_verified_offline(reg: Registry, net: dict[str, Party]):
    a = net["node-a"]
    reg.publish(a.manifest("cube1", "1.0.0"), "node-a")
    reg.publish(a.manifest("cube2", "1.0.0"), "node-a")
    reg.grant("cube1", "node-b", ["export"])
    tok = reg.issue_token("node-b", "cube1", "export", ttl_s=30)
    v = TokenVerifier(reg.public_key)
    assert v.verify(tok, principal="node:node-b", cube_id="cube1", action="export").principal == "node:node-b"
    with pytest.raises(PermissionDeniedError, match="for cube 'cube1', not 'cube2'"):
        v.verify(tok, principal="node:node-b", cube_id="cube2", action="export")
    with pytest.raises(PermissionDeniedError, match="allows 'export', not 'admin'"):
        v.verify(tok, principal="node:node-b", cube_id="cube1", action="admin")
    with pytest.raises(PermissionDeniedError, match="issued to"):
        v.verify(tok, principal="node:node-c", cube_id="cube1", action="export")
    with pytest.raises(PermissionDeniedError, match="expired"):
        v.verify(tok, principal="node:node-b", cube_id="cube1", action="export", now=time.time() + 60)
    forged = type(tok)(token=tok.token.replace(b"node-b", b"node-c"), signature=tok.signature)
    with pytest.raises(AuthenticationError, match="forged"):
        v.verify(forged, principal="node:node-c", cube_id="cube1", action="export")
    with pytest.raises(AuthenticationError):
        v.verify(None, principal="node:node-b", cube_id="cube1", action="export")
    with pytest.raises(PermissionDeniedError):
        reg.issue_token("node-c", "cube1", "export")
    with pytest.raises(PermissionDeniedError, match="may not obtain tokens"):
        reg.issue_token("node-b", "cube1", "export", requested_by="node-c")
    reg.revoke("cube1", "node-b")
    v2 = reg.token_verifier()
    with pytest.raises(PermissionDeniedError, match="revoked"):
        v2.verify(tok, principal="node:node-b", cube_id="cube1", action="export")
    with pytest.raises(PermissionDeniedError):
        reg.issue_token("node-b", "cube1", "export")


def test_audit_chain_detects_edit_delete_and_truncation(reg: Registry, net: dict[str, Party]):
    reg.publish(net["node-a"].manifest("c", "1.0.0"), "node-a")
    for _ in range(3):
        reg.is_allowed("node-b", "c", "read")
    ok = reg.verify_audit()
    assert ok.ok and ok.entries == reg.audit_count() >= 7
    with reg.engine.begin() as conn:
        conn.execute(update(db.audit).where(db.audit.c.sequence == 5).values(allowed=True))
    bad = reg.verify_audit()
    assert not bad.ok and bad.bad_sequence == 5 and "altered" in bad.problem
    with reg.engine.begin() as conn:
        conn.execute(update(db.audit).where(db.audit.c.sequence == 5).values(allowed=False))
    assert reg.verify_audit().ok
    with reg.engine.begin() as conn:
        conn.execute(delete(db.audit).where(db.audit.c.sequence == 4))
    bad = reg.verify_audit()
    assert not bad.ok and bad.bad_sequence == 4 and "deleted" in bad.problem
    last = reg.audit_count() + 1
    with reg.engine.begin() as conn:
        conn.execute(delete(db.audit).where(db.audit.c.sequence >= 4))
    bad = reg.verify_audit()
    assert not bad.ok and "truncated" in bad.problem and last > 4


def test_reopen_keeps_state_and_key(tmp_path: Path, net: dict[str, Party]):
    r = Registry.open(tmp_path / "r2")
    r.register_node(net["node-a"].message())
    kid = r.key_id
    r.close()
    r = Registry.open(tmp_path / "r2")
    assert r.key_id == kid and r.node("node-a") is not None and r.verify_audit().ok
    assert oct((tmp_path / "r2" / "key" / "signing.pem").stat().st_mode & 0o777) == "0o600"
    r.close()


def test_concurrent_decisions_keep_one_chain(tmp_path: Path, db_url: str | None, net: dict[str, Party]):  # noqa: F811
    """Writers racing (threads here; processes share the same row lock on PostgreSQL) still append one
    unbroken chain: the head row is locked for each append."""
    from concurrent.futures import ThreadPoolExecutor

    r = Registry.open(tmp_path / "conc", db_url=db_url)
    r.register_node(net["node-a"].message())
    r.publish(net["node-a"].manifest("c", "1.0.0"), "node-a")
    r.grant("c", "node-b", ["read"])
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: r.is_allowed(f"node-{'bc'[i % 2]}", "c", "read"), range(40)))
    assert results.count(True) == 20 and results.count(False) == 20
    v = r.verify_audit()
    assert v.ok and v.entries == r.audit_count() == 43  # register, publish, grant, 40 decisions
    r.close()
