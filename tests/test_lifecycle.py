"""Tests of cube lifecycle and the time machine (memfed.node.lifecycle): real files, real SQLite, real
processes killed mid-transition, tiny LoRA payloads made with safetensors from random tensors."""

from __future__ import annotations

import gzip
import itertools
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save

from memfed.cube import CubeManifest, new_manifest, payload_digest
from memfed.errors import IntegrityError, InvalidArgumentError, LifecycleError, NotFoundError
from memfed.mip.v1 import cube_pb2
from memfed.node.lifecycle import (
    ACTIVATED,
    ARCHIVED,
    EXPIRED,
    GENERATED,
    MERGED,
    TRANSITIONS,
    Lifecycle,
    is_legal,
    legal_targets,
)
from memfed.node.store import CubeStore

NAMES = {
    GENERATED: "generated",
    ACTIVATED: "activated",
    MERGED: "merged",
    ARCHIVED: "archived",
    EXPIRED: "expired",
}
ALL = list(NAMES)
LEGAL = [(a, b) for a in ALL for b in ALL if b in TRANSITIONS[a]]
ILLEGAL = [(a, b) for a in ALL for b in ALL if a != b and b not in TRANSITIONS[a]]
BASE = cube_pb2.BaseModelFingerprint(
    architecture="TinyLlama", config_digest=b"\1" * 32, shapes_digest=b"\2" * 32
)


def lora_payload(seed: int, *, trained: bool = True) -> bytes:
    """A rank-2 LoRA on one q_proj as safetensors bytes; untrained means B = 0, as PEFT initialises it."""
    rng = np.random.default_rng(seed)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    b = rng.standard_normal((16, 2)).astype(np.float32) if trained else np.zeros((16, 2), np.float32)
    return save(
        {
            f"{prefix}.lora_A.weight": rng.standard_normal((2, 16)).astype(np.float32),
            f"{prefix}.lora_B.weight": b,
        }
    )


def lora_cube(
    cube_id: str = "legal", version: str = "1.0.0", seed: int = 0, *, payload: bytes | None = None, **kw
) -> tuple[CubeManifest, bytes]:
    payload = lora_payload(seed) if payload is None else payload
    m = new_manifest(
        cube_id=cube_id,
        version=version,
        kind="lora",
        digest=payload_digest(payload),
        size_bytes=len(payload),
        base_model=BASE,
        payload=cube_pb2.PayloadDescription(
            lora=cube_pb2.LoraSpec(rank=2, alpha=4.0, target_modules=["q_proj"])
        ),
        **kw,
    )
    return m, payload


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(root: Path) -> Iterator[CubeStore]:
    with CubeStore(root) as s:
        yield s


@pytest.fixture
def life(store: CubeStore) -> Lifecycle:
    return Lifecycle(store)


def files_under(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for sub in ("objects", "cold", "tmp")
        for p in sorted((root / sub).rglob("*"))
        if p.is_file()
    }


def snapshot(store: CubeStore, cube_id: str, version: str) -> tuple[object, ...]:
    """Everything a refused transition must leave as it was."""
    history = [(e.from_state, e.to_state, e.at, e.reason) for e in store.lifecycle_history(cube_id, version)]
    return (
        store.get_manifest(cube_id, version),
        store.is_cold(cube_id, version),
        history,
        files_under(store.root),
    )


def clean(store: CubeStore) -> None:
    """verify_all finds nothing wrong and nothing left over."""
    report = store.verify_all()
    assert report.ok, report.problems
    assert report.orphans == []


def reach(life: Lifecycle, state: int, version: str = "1.0.0") -> None:
    """Drive a freshly put (GENERATED) legal@version to ``state`` by a legal path."""
    if state != GENERATED:
        life.transition("legal", version, state, f"test: to {NAMES[state]}")


# -- the table ----------------------------------------------------------------------------------------


def test_transition_table() -> None:
    assert {NAMES[a]: sorted(NAMES[b] for b in bs) for a, bs in TRANSITIONS.items()} == {
        "generated": ["activated", "archived", "expired", "merged"],
        "activated": ["archived", "expired", "generated", "merged"],
        "merged": ["activated", "archived", "expired"],
        "archived": ["activated", "expired"],
        "expired": ["activated"],
    }
    assert legal_targets("archived") == ["activated", "expired"]
    assert is_legal("generated", ACTIVATED) and not is_legal("expired", "archived")
    assert not is_legal("activated", "activated")  # a no-op, not a transition
    with pytest.raises(InvalidArgumentError):
        is_legal("melted", "activated")
    assert len(LEGAL) == 14 and len(ILLEGAL) == 6


@pytest.mark.parametrize(("old", "new"), LEGAL, ids=[f"{NAMES[a]}-{NAMES[b]}" for a, b in LEGAL])
def test_every_legal_transition_works_and_is_recorded(
    store: CubeStore, life: Lifecycle, old: int, new: int
) -> None:
    m, payload = lora_cube()
    store.put(m, payload)
    reach(life, old)
    before = datetime.now(UTC)
    event = life.transition("legal", "1.0.0", NAMES[new], "because the test says so")
    assert event is not None and (event.from_state, event.to_state) == (old, new)
    assert event.reason == "because the test says so" and event.at.tzinfo is not None and event.at >= before
    assert store.lifecycle_history("legal", "1.0.0")[-1] == event
    assert life.state("legal", "1.0.0") == NAMES[new] and store.get_manifest("legal").lifecycle == new
    cold = new == ARCHIVED or (old == ARCHIVED and new == EXPIRED)
    assert store.is_cold("legal", "1.0.0") is cold
    assert store.cold_path(m.digest).exists() is cold and store.payload_path(m.digest).exists() is not cold
    if new in (GENERATED, ACTIVATED, MERGED):
        assert store.get("legal", "1.0.0").payload == payload
        assert life.current("legal") == "1.0.0"
    else:
        with pytest.raises(LifecycleError, match="restore it first") as err:
            store.get("legal", "1.0.0")
        assert err.value.hint == "memfed module restore legal@1.0.0"
        assert life.current("legal") is None
    clean(store)


@pytest.mark.parametrize(("old", "new"), ILLEGAL, ids=[f"{NAMES[a]}-{NAMES[b]}" for a, b in ILLEGAL])
def test_every_illegal_transition_raises_and_changes_nothing(
    store: CubeStore, life: Lifecycle, old: int, new: int
) -> None:
    store.put(*lora_cube())
    reach(life, old)
    before = snapshot(store, "legal", "1.0.0")
    with pytest.raises(LifecycleError) as err:
        life.transition("legal", "1.0.0", new, "should not happen")
    assert f"from {NAMES[old]} to {NAMES[new]}" in err.value.message
    assert ", ".join(legal_targets(old)) in (err.value.hint or "")
    assert err.value.exit_code == 9
    assert snapshot(store, "legal", "1.0.0") == before


def test_same_state_is_a_noop_and_reasons_are_required(store: CubeStore, life: Lifecycle) -> None:
    store.put(*lora_cube())
    life.transition("legal", "1.0.0", "activated", "load")
    before = snapshot(store, "legal", "1.0.0")
    assert life.transition("legal", "1.0.0", "activated", "again") is None
    assert life.restore("legal", "1.0.0", "already active") is None
    assert snapshot(store, "legal", "1.0.0") == before
    for reason in ("", "   "):
        with pytest.raises(InvalidArgumentError, match="needs a reason"):
            life.transition("legal", "1.0.0", "archived", reason)
    with pytest.raises(InvalidArgumentError):
        life.transition("legal", "1.0.0", "melted", "x")
    with pytest.raises(NotFoundError):
        life.transition("legal", "9.9.9", "archived", "x")
    life.transition("legal", "1.0.0", "generated", "unload")
    with pytest.raises(LifecycleError, match="nothing to restore"):
        life.restore("legal", "1.0.0", "x")
    assert snapshot(store, "legal", "1.0.0")[0].lifecycle == GENERATED


def test_store_refuses_to_unarchive_without_restoring(store: CubeStore, life: Lifecycle) -> None:
    m, payload = lora_cube()
    store.put(m, payload)
    life.archive("legal", "1.0.0", "cold")
    with pytest.raises(LifecycleError, match="cannot become activated before it is restored"):
        store.set_lifecycle("legal", "1.0.0", "activated", "bypassing the lifecycle")
    with pytest.raises(LifecycleError, match="another process changed it"):
        store.set_lifecycle("legal", "1.0.0", "expired", "stale caller", expect="activated")
    assert life.state("legal", "1.0.0") == "archived"
    store.put(m, payload)  # putting an archived version again changes nothing and leaves no hot copy
    assert not store.payload_path(m.digest).exists()
    clean(store)


# -- archive and restore ------------------------------------------------------------------------------


def test_archive_compresses_and_restore_brings_the_same_bytes_back(store: CubeStore, life: Lifecycle) -> None:
    m, payload = lora_cube(payload=lora_payload(1, trained=False))  # fresh LoRA: B is zeros, compresses
    store.put(m, payload)
    life.transition("legal", "1.0.0", "activated", "load")
    hot, cold = store.payload_path(m.digest), store.cold_path(m.digest)
    event = life.archive("legal", "1.0.0", "unused for 30 days")
    assert event is not None and (event.from_name, event.to_name) == ("activated", "archived")
    assert not hot.exists() and cold.exists()
    assert cold.parent.parent == store.root / "cold" and cold.name.endswith(".gz")
    assert gzip.decompress(cold.read_bytes()) == payload  # plain gzip: zcat reads it
    assert cold.stat().st_size < len(payload)
    with pytest.raises(LifecycleError, match="archived"):
        store.get("legal", "1.0.0")
    with pytest.raises(LifecycleError, match="archived"):
        store.get("legal")  # the only version: nothing current to fall back on
    with pytest.raises(LifecycleError):
        store.get_by_digest(m.digest)
    assert store.get_manifest("legal").lifecycle == ARCHIVED  # metadata stays readable
    assert [(x.version, x.lifecycle) for x in store.list()] == [("1.0.0", ARCHIVED)]
    assert store.list(states=["archived"])[0].cube_id == "legal"
    clean(store)

    event = life.restore("legal", "1.0.0", "needed again")
    assert event is not None and (event.from_name, event.to_name, event.reason) == (
        "archived",
        "activated",
        "needed again",
    )
    assert store.get("legal").payload == payload and hot.exists() and not cold.exists()
    assert [(e.from_name, e.to_name) for e in life.history("legal", "1.0.0")] == [
        ("unspecified", "generated"),
        ("generated", "activated"),
        ("activated", "archived"),
        ("archived", "activated"),
    ]
    clean(store)


def test_archiving_a_shared_payload_keeps_the_hot_file_for_the_other_version(
    store: CubeStore, life: Lifecycle
) -> None:
    m1, payload = lora_cube(version="1.0.0")
    m2, _ = lora_cube(version="1.0.1", payload=payload)  # a metadata-only release: same bytes
    store.put(m1, payload)
    store.put(m2, payload)
    hot, cold = store.payload_path(m1.digest), store.cold_path(m1.digest)
    life.archive("legal", "1.0.0", "superseded")
    assert hot.exists() and cold.exists()
    assert store.get("legal", "1.0.1").payload == payload and store.get("legal").manifest.version == "1.0.1"
    with pytest.raises(LifecycleError):
        store.get("legal", "1.0.0")
    assert store.get_by_digest(m1.digest).manifest.version == "1.0.1"  # the loadable one
    clean(store)
    life.archive("legal", "1.0.1", "retired")
    assert not hot.exists() and cold.exists()
    clean(store)
    life.restore("legal", "1.0.0", "back")
    assert hot.exists() and cold.exists()  # 1.0.1 is still archived: its cold copy stays
    assert store.get("legal", "1.0.0").payload == payload
    clean(store)
    assert store.delete("legal", "1.0.1") is True  # the cold copy goes with the last archived user
    assert not cold.exists() and hot.exists()
    clean(store)


def test_a_bare_archived_state_with_a_hot_payload_is_archived_properly(
    store: CubeStore, life: Lifecycle
) -> None:
    m, payload = lora_cube()
    store.put(m, payload)
    store.set_lifecycle("legal", "1.0.0", "archived", "set by an old tool")  # payload left hot
    assert store.get("legal").payload == payload  # as before this module: nothing moved
    event = life.archive("legal", "1.0.0", "finish the job")
    assert event is not None and event.to_name == "archived"
    assert store.is_cold("legal", "1.0.0") and not store.payload_path(m.digest).exists()
    clean(store)


@pytest.mark.parametrize("damage", ["flip", "truncate", "trailing", "oversize", "missing"])
def test_a_damaged_cold_copy_is_refused_and_changes_nothing(
    store: CubeStore, life: Lifecycle, damage: str
) -> None:
    m, payload = lora_cube()
    store.put(m, payload)
    life.archive("legal", "1.0.0", "cold")
    cold = store.cold_path(m.digest)
    os.chmod(cold, 0o644)
    data = cold.read_bytes()
    if damage == "flip":
        i = len(data) // 2
        cold.write_bytes(data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1 :])
    elif damage == "truncate":
        cold.write_bytes(data[:-20])
    elif damage == "trailing":
        cold.write_bytes(data + b"junk")
    elif damage == "oversize":
        cold.write_bytes(gzip.compress(payload + bytes(1000)))
    else:
        cold.unlink()
    before = snapshot(store, "legal", "1.0.0")
    with pytest.raises(IntegrityError, match="missing" if damage == "missing" else "damaged") as err:
        life.restore("legal", "1.0.0", "try")
    assert "put this cube again" in (err.value.hint or "")
    assert snapshot(store, "legal", "1.0.0") == before
    assert [p.kind for p in store.verify_all().problems] == ["missing" if damage == "missing" else "corrupt"]


def test_a_damaged_hot_payload_is_not_archived(store: CubeStore, life: Lifecycle) -> None:
    m, payload = lora_cube()
    store.put(m, payload)
    hot = store.payload_path(m.digest)
    os.chmod(hot, 0o644)
    hot.write_bytes(payload[:-1] + bytes([payload[-1] ^ 1]))
    before = snapshot(store, "legal", "1.0.0")
    with pytest.raises(IntegrityError, match="damaged"):
        life.archive("legal", "1.0.0", "cold")
    assert snapshot(store, "legal", "1.0.0") == before
    hot.unlink()
    with pytest.raises(IntegrityError, match="missing"):
        life.archive("legal", "1.0.0", "cold")
    assert life.state("legal", "1.0.0") == "generated" and not store.is_cold("legal", "1.0.0")


# -- expiry and purge ---------------------------------------------------------------------------------


def test_expired_cubes_are_hidden_and_purged_after_retention(store: CubeStore, life: Lifecycle) -> None:
    m1, p1 = lora_cube(version="1.0.0", seed=1)
    m2, p2 = lora_cube(version="2.0.0", seed=2)
    store.put(m1, p1)
    store.put(m2, p2)
    life.transition("legal", "2.0.0", "activated", "load")
    event = life.expire("legal", "2.0.0", "ttl passed")
    assert event is not None and event.to_name == "expired"
    assert [x.version for x in store.list()] == ["1.0.0"]
    assert [x.version for x in store.list(include_expired=True)] == ["1.0.0", "2.0.0"]
    assert [x.version for x in store.list(states=["expired"])] == ["2.0.0"]
    assert store.get("legal").payload == p1 and life.current("legal") == "1.0.0"
    with pytest.raises(LifecycleError, match="expired"):
        store.get("legal", "2.0.0")
    assert store.versions("legal") == ["1.0.0", "2.0.0"]  # hidden, not gone

    assert life.purge_expired(3600) == []  # expired just now: within retention
    later = event.at + timedelta(hours=1, seconds=1)
    assert life.purge_expired(3600, now=later - timedelta(seconds=2)) == []
    purged = life.purge_expired(3600, now=later)
    assert [(p.cube_id, p.version, p.expired_at, p.payload_removed) for p in purged] == [
        ("legal", "2.0.0", event.at, True)
    ]
    assert store.versions("legal") == ["1.0.0"] and not store.payload_path(m2.digest).exists()
    with pytest.raises(NotFoundError):
        life.restore("legal", "2.0.0", "too late")
    with pytest.raises(NotFoundError):
        life.history("legal", "2.0.0")
    assert life.purge_expired(0, now=later) == []
    assert store.get("legal").payload == p1
    clean(store)
    with pytest.raises(InvalidArgumentError):
        life.purge_expired(-1)
    with pytest.raises(InvalidArgumentError, match="timezone"):
        life.purge_expired(0, now=datetime(2030, 1, 1))


def test_restore_of_expired_cubes_before_purge(store: CubeStore, life: Lifecycle) -> None:
    hot_m, hot_p = lora_cube("hot", seed=1)
    cold_m, cold_p = lora_cube("frozen", seed=2)
    gone_m, gone_p = lora_cube("gone", seed=3)
    for m, p in ((hot_m, hot_p), (cold_m, cold_p), (gone_m, gone_p)):
        store.put(m, p)
    life.transition("hot", "1.0.0", "activated", "load")
    life.expire("hot", "1.0.0", "ttl")  # payload stays hot
    life.archive("frozen", "1.0.0", "unused")
    life.expire("frozen", "1.0.0", "ttl")  # payload stays cold
    life.archive("gone", "1.0.0", "unused")
    life.expire("gone", "1.0.0", "ttl")
    assert store.is_cold("frozen", "1.0.0") and not store.is_cold("hot", "1.0.0")
    assert store.list() == []
    clean(store)

    life.restore("hot", "1.0.0", "still needed")
    life.restore("frozen", "1.0.0", "still needed")
    assert store.get("hot").payload == hot_p and store.get("frozen").payload == cold_p
    assert not store.cold_path(cold_m.digest).exists()
    assert [e.to_name for e in life.history("frozen")] == ["generated", "archived", "expired", "activated"]

    far = datetime.now(UTC) + timedelta(days=365)
    assert [(p.cube_id, p.payload_removed) for p in life.purge_expired(86400, now=far)] == [("gone", True)]
    assert not store.cold_path(gone_m.digest).exists()  # a cold payload is purged too
    assert [m.cube_id for m in store.list()] == ["frozen", "hot"]
    clean(store)


# -- merge ----------------------------------------------------------------------------------------------


# -- the time machine -----------------------------------------------------------------------------------


CHAIN = ["1.0.0", "1.1.0", "1.2.0", "2.0.0"]


def publish_chain(store: CubeStore, life: Lifecycle) -> dict[str, tuple[CubeManifest, bytes]]:
    """1.0.0 -> 1.1.0 -> 1.2.0 -> 2.0.0, each naming its parents' digests oldest first, each activated
    as it arrives; current() follows."""
    cubes: dict[str, tuple[CubeManifest, bytes]] = {}
    parents: list[str] = []
    for i, version in enumerate(CHAIN):
        m, p = lora_cube(version=version, seed=10 + i, version_chain=parents)
        store.put(m, p)
        life.transition("legal", version, "activated", f"release {version}")
        cubes[version] = (m, p)
        parents = [*parents, m.digest]
        assert life.current("legal") == version and store.get("legal").payload == p
    assert list(cubes["2.0.0"][0].version_chain) == [cubes[v][0].digest for v in CHAIN[:3]]
    return cubes


def test_rollback_three_versions_and_forward_again(store: CubeStore, life: Lifecycle) -> None:
    cubes = publish_chain(store, life)

    back = life.rollback("legal", "1.0.0", "2.0.0 gives wrong answers")
    assert (back.version, back.previous, back.archived) == ("1.0.0", "2.0.0", ["2.0.0", "1.2.0", "1.1.0"])
    assert life.current("legal") == "1.0.0" and store.get("legal").payload == cubes["1.0.0"][1]
    for version in CHAIN[1:]:
        assert life.state("legal", version) == "archived" and store.is_cold("legal", version)
        assert life.history("legal", version)[-1].reason == "rolled back to 1.0.0: 2.0.0 gives wrong answers"
    assert [m.version for m in store.list(states=["activated"])] == ["1.0.0"]
    clean(store)

    life.restore("legal", "2.0.0", "fixed upstream after all")  # rolling forward is a restore
    assert life.current("legal") == "2.0.0" and store.get("legal").payload == cubes["2.0.0"][1]
    assert life.state("legal", "1.1.0") == "archived"  # versions in between stay archived
    clean(store)

    # Back again, naming the target by its digest on 2.0.0's version chain.
    back = life.rollback("legal", cubes["1.1.0"][0].digest, "bisecting")
    assert (back.version, back.previous, back.archived) == ("1.1.0", "2.0.0", ["2.0.0"])
    assert life.current("legal") == "1.1.0" and store.get("legal").payload == cubes["1.1.0"][1]
    clean(store)

    forward = life.rollback("legal", "2.0.0", "bisected: 2.0.0 is fine")  # a rollback may go forward too
    assert (forward.version, forward.previous, forward.archived) == ("2.0.0", "1.1.0", [])
    assert life.current("legal") == "2.0.0" and store.get("legal").payload == cubes["2.0.0"][1]
    for version, (_, payload) in cubes.items():
        if life.state("legal", version) == "archived":
            life.restore("legal", version, "check every version's bytes")
        assert store.get("legal", version).payload == payload
    assert [(e.from_name, e.to_name) for e in life.history("legal", "2.0.0")] == [
        ("unspecified", "generated"),
        ("generated", "activated"),
        ("activated", "archived"),
        ("archived", "activated"),
        ("activated", "archived"),
        ("archived", "activated"),
    ]
    timeline = life.history("legal")
    assert len(timeline) == sum(len(life.history("legal", v)) for v in CHAIN)
    assert [e.at for e in timeline] == sorted(e.at for e in timeline)
    clean(store)
    assert store.gc().removed_orphans == []


def test_rollback_targets(store: CubeStore, life: Lifecycle) -> None:
    cubes = publish_chain(store, life)
    before = [snapshot(store, "legal", v) for v in CHAIN]
    with pytest.raises(NotFoundError, match=r"no version 3\.0\.0"):
        life.rollback("legal", "3.0.0", "x")
    with pytest.raises(NotFoundError, match="not on the version chain"):
        life.rollback("legal", "sha256:" + "0" * 64, "x")
    with pytest.raises(InvalidArgumentError):
        life.rollback("legal", "one", "x")
    with pytest.raises(NotFoundError):
        life.rollback("nothing", "1.0.0", "x")
    assert [snapshot(store, "legal", v) for v in CHAIN] == before
    # A parent named by the chain but no longer held by this store.
    life.rollback("legal", "1.2.0", "x")
    store.delete("legal", "1.0.0")
    with pytest.raises(NotFoundError, match=r"the version chain of legal@1\.2\.0 names"):
        life.rollback("legal", cubes["1.0.0"][0].digest, "x")
    assert life.rollback("legal", "1.2.0", "again").archived == []  # already current: nothing to do
    clean(store)


def test_rollback_stops_before_changing_anything_when_the_target_is_damaged(
    store: CubeStore, life: Lifecycle
) -> None:
    cubes = publish_chain(store, life)
    life.rollback("legal", "1.0.0", "back")
    life.restore("legal", "2.0.0", "forward")
    cold = store.cold_path(cubes["1.1.0"][0].digest)
    os.chmod(cold, 0o644)
    cold.write_bytes(b"not gzip")
    before = [snapshot(store, "legal", v) for v in CHAIN]
    with pytest.raises(IntegrityError):
        life.rollback("legal", "1.1.0", "x")
    assert [snapshot(store, "legal", v) for v in CHAIN] == before and life.current("legal") == "2.0.0"


# -- crashes --------------------------------------------------------------------------------------------


KILL_SCRIPT = """
import sys, time
from memfed.node.store import CubeStore
from memfed.node.store_index import StoreIndex
from memfed.node.lifecycle import Lifecycle

root, op, point = sys.argv[1:]

def pause(*args, **kwargs):
    print("PAUSED", flush=True)
    while True:
        time.sleep(60)

if point == "before_commit":
    StoreIndex.commit = pause
else:  # after the commit, before the old copy is removed
    CubeStore._remove_if_unreferenced = pause
life = Lifecycle(CubeStore(root))
getattr(life, op)("legal", "1.0.0", "killed midway")
print("DONE", flush=True)
"""


@pytest.mark.parametrize("point", ["before_commit", "after_commit"])
@pytest.mark.parametrize("op", ["archive", "restore"])
def test_kill_9_midway_leaves_a_consistent_store(root: Path, op: str, point: str) -> None:
    m, payload = lora_cube()
    with CubeStore(root) as s:
        s.put(m, payload)
        Lifecycle(s).transition("legal", "1.0.0", "activated", "load")
        if op == "restore":
            Lifecycle(s).archive("legal", "1.0.0", "cold")
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(KILL_SCRIPT), str(root), op, point],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line.strip() == "PAUSED", proc.stderr.read()  # type: ignore[union-attr]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

    with CubeStore(root) as s:
        life = Lifecycle(s)
        committed = point == "after_commit"
        archived = (op == "archive") == committed  # the state the row is in now
        assert life.state("legal", "1.0.0") == ("archived" if archived else "activated")
        assert s.is_cold("legal", "1.0.0") is archived
        report = s.verify_all()
        assert report.ok, report.problems  # the row's payload is where the row says, intact
        leftover = s.payload_path(m.digest) if archived else s.cold_path(m.digest)
        assert report.orphans == [leftover]  # the copy the row does not use
        assert [p.kind for p in s.verify_all().problems] == []
        assert s.gc().removed_orphans == [leftover] and not leftover.exists()
        clean(s)
        assert list((root / "tmp").iterdir()) == []
        # The store works normally afterwards: the transition can be made (again) and undone.
        if archived:
            life.restore("legal", "1.0.0", "after the crash")
        else:
            life.archive("legal", "1.0.0", "after the crash")
            life.restore("legal", "1.0.0", "after the crash")
        assert s.get("legal").payload == payload
        clean(s)


# -- schema -----------------------------------------------------------------------------------------------


def test_a_version_1_index_is_upgraded_in_place(root: Path) -> None:
    m, payload = lora_cube()
    with CubeStore(root) as s:
        s.put(m, payload)
    with sqlite3.connect(root / "index.sqlite") as conn:  # what a store written before cold storage has
        conn.execute("ALTER TABLE cubes DROP COLUMN cold")
        conn.execute("PRAGMA user_version = 1")
    with CubeStore(root) as s:
        assert s.get("legal").payload == payload and not s.is_cold("legal", "1.0.0")
        Lifecycle(s).archive("legal", "1.0.0", "after the upgrade")
        assert s.is_cold("legal", "1.0.0")
        clean(s)
    with sqlite3.connect(root / "index.sqlite") as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2


def test_every_pair_is_covered() -> None:
    pairs = set(itertools.permutations(ALL, 2))
    assert pairs == set(LEGAL) | set(ILLEGAL) and not set(LEGAL) & set(ILLEGAL)
