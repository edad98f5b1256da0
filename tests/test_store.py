"""Tests of the cube store (memfed.node.store): real files, real SQLite, real processes, no mocks."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from memfed.cube import CubeManifest, new_manifest, payload_digest
from memfed.cube.manifest import LIFECYCLE_NAMES
from memfed.errors import (
    AlreadyExistsError,
    IntegrityError,
    InvalidArgumentError,
    InvalidManifestError,
    NotFoundError,
    StorageError,
)
from memfed.node import store_files
from memfed.node.store import CubeStore

WRITER = Path(__file__).parent / "helpers" / "store_writer.py"
ACTIVATED = LIFECYCLE_NAMES["activated"]
GENERATED = LIFECYCLE_NAMES["generated"]
ARCHIVED = LIFECYCLE_NAMES["archived"]


def cube(cube_id: str = "legal", version: str = "1.0.0", size: int = 1000, seed: int = 0, **kw):  # type: ignore[no-untyped-def]
    """A plaintext cube with a random payload (``seed`` fixes the bytes, so the digest)."""
    payload = random.Random(seed).randbytes(size)
    m = new_manifest(
        cube_id=cube_id,
        version=version,
        kind="plaintext",
        digest=payload_digest(payload),
        size_bytes=size,
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


def tree(root: Path) -> dict[str, int]:
    """Every file under objects/ and tmp/ with its size: what "the store was not changed" compares."""
    out = {}
    for sub in ("objects", "tmp"):
        for p in sorted((root / sub).rglob("*")):
            if p.is_file():
                out[str(p.relative_to(root))] = p.stat().st_size
    return out


def snapshot(s: CubeStore) -> tuple[list[bytes], dict[str, int]]:
    return [m.SerializeToString(deterministic=True) for m in s.list()], tree(s.root)


# -- basics -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [3 * 1024 * 1024 + 17, store_files.READ_INLINE_LIMIT + 3 * 1024 * 1024 + 17])
def test_round_trip(store: CubeStore, size: int) -> None:
    m, payload = cube(size=size)  # hashed after the read, and (the larger) overlapped with it
    stored = store.put(m, payload)
    assert stored == m
    got = store.get("legal", "1.0.0")
    assert got.payload == payload and type(got.payload) is bytes
    assert got.manifest == m
    got.verify()
    assert store.get_manifest("legal") == m
    assert store.get_by_digest(m.digest).payload == payload
    assert store.has("legal") and store.has("legal", "1.0.0") and not store.has("legal", "2.0.0")
    path = store.payload_path(m.digest)
    assert path.read_bytes() == payload
    assert path.stat().st_mode & 0o777 == 0o444
    assert list((store.root / "tmp").iterdir()) == []


def test_small_and_empty_payloads(store: CubeStore) -> None:
    for i, size in enumerate((0, 1, 2, 100, 600_000)):
        m, payload = cube(version=f"1.0.{i}", size=size, seed=i)
        store.put(m, payload)
        assert store.get("legal", m.version).payload == payload


def test_accepts_bytearray_and_memoryview(store: CubeStore) -> None:
    m, payload = cube(size=2_000_000)
    store.put(m, memoryview(bytearray(payload)))
    assert store.get("legal").payload == payload


def test_put_stream(store: CubeStore) -> None:
    m, payload = cube(size=5_000_000)
    chunks = [payload[i : i + 1_000_000] for i in range(0, len(payload), 1_000_000)]
    store.put_stream(m, iter(chunks))
    assert store.get("legal").payload == payload
    m2, payload2 = cube(version="2.0.0", size=5_000_000, seed=9)
    with pytest.raises(IntegrityError):
        store.put_stream(m2, [payload2[:-1] + b"x"])
    with pytest.raises(IntegrityError, match="bytes but its manifest says"):
        store.put_stream(m2, [payload2[:-1]])
    assert not store.has("legal", "2.0.0")
    assert list((store.root / "tmp").iterdir()) == []


def test_newest_version_by_semver(store: CubeStore) -> None:
    for i, v in enumerate(["1.2.0", "1.10.0", "1.9.9", "2.0.0-rc.1", "0.1.0"]):
        store.put(*cube(version=v, seed=i))
    assert store.get("legal").manifest.version == "2.0.0-rc.1"
    store.put(*cube(version="2.0.0", seed=99))
    assert store.get("legal").manifest.version == "2.0.0"
    assert store.versions("legal") == ["0.1.0", "1.2.0", "1.9.9", "1.10.0", "2.0.0-rc.1", "2.0.0"]
    assert store.versions("nothing") == []
    with pytest.raises(NotFoundError):
        store.get("nothing")
    with pytest.raises(NotFoundError):
        store.get("legal", "3.0.0")
    with pytest.raises(InvalidArgumentError):
        store.get("legal", "not-a-version")


def test_list_filters(store: CubeStore) -> None:
    store.put(*cube("a_b", seed=1))
    store.put(*cube("axb", seed=2))  # "_" must not act as a wildcard
    store.put(*cube("a_b", version="2.0.0", seed=3))
    store.set_lifecycle("a_b", "2.0.0", "activated", "test")
    assert [(m.cube_id, m.version) for m in store.list()] == [
        ("a_b", "1.0.0"),
        ("a_b", "2.0.0"),
        ("axb", "1.0.0"),
    ]
    assert [m.cube_id for m in store.list("a_")] == ["a_b", "a_b"]
    assert [(m.cube_id, m.version) for m in store.list(states=["activated"])] == [("a_b", "2.0.0")]
    assert [m.version for m in store.list("a_b", states=[GENERATED])] == ["1.0.0"]
    assert store.list(states=[]) == []
    with pytest.raises(InvalidArgumentError):
        store.list(states=["flying"])


def test_reput_is_idempotent_and_versions_are_immutable(store: CubeStore) -> None:
    m, payload = cube()
    store.put(m, payload)
    before = snapshot(store)
    assert store.put(m, payload) == m  # identical: no-op
    store.set_lifecycle("legal", "1.0.0", "activated")
    assert store.put(m, payload).lifecycle == ACTIVATED  # local lifecycle state is kept
    m_other, payload_other = cube(seed=5)
    with pytest.raises(AlreadyExistsError, match="another payload"):
        store.put(m_other, payload_other)
    m_meta, _ = cube(tags=["changed"])
    with pytest.raises(AlreadyExistsError, match="other metadata"):
        store.put(m_meta, payload)
    with pytest.raises(IntegrityError):  # an idempotent re-put still checks the bytes it is given
        store.put(m, payload[:-1] + b"\0")
    assert snapshot(store)[1] == before[1]


def test_digest_mismatch_on_put_leaves_nothing(store: CubeStore) -> None:
    store.put(*cube("keep", seed=1))
    before = snapshot(store)
    m, payload = cube(size=4_000_000)
    tampered = bytearray(payload)
    tampered[123_456] ^= 1
    with pytest.raises(IntegrityError, match="does not hash to its manifest's digest"):
        store.put(m, tampered)
    with pytest.raises(IntegrityError, match="bytes but its manifest says"):
        store.put(m, payload[:-10])
    assert snapshot(store) == before
    assert not store.has("legal")


def test_bad_arguments(store: CubeStore) -> None:
    m, payload = cube()
    with pytest.raises(InvalidArgumentError):
        store.put(m, "not bytes")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        store.put(b"not a manifest", payload)  # type: ignore[arg-type]
    broken = CubeManifest()
    broken.CopyFrom(m)
    broken.digest = "md5:1234"
    with pytest.raises(InvalidManifestError):
        store.put(broken, payload)
    with pytest.raises(InvalidArgumentError):
        store.get_by_digest("sha256:nothex")
    with pytest.raises(NotFoundError):
        store.get_by_digest("sha256:" + "0" * 64)


# -- damage on disk -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [3_000_000, store_files.READ_INLINE_LIMIT + 3_000_000])
def test_corrupt_payload_is_detected_on_read(store: CubeStore, size: int) -> None:
    m, payload = cube(size=size)
    store.put(m, payload)
    other_m, other_payload = cube("other", seed=7)
    store.put(other_m, other_payload)
    path = store.payload_path(m.digest)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(2_500_000)
        byte = f.read(1)
        f.seek(2_500_000)
        f.write(bytes([byte[0] ^ 0x40]))
    before = snapshot(store)
    with pytest.raises(IntegrityError) as err:
        store.get("legal")
    assert str(path) in str(err.value) and "corrupt" in str(err.value)
    assert "put this cube again" in (err.value.hint or "")
    with pytest.raises(IntegrityError):
        store.get_by_digest(m.digest)
    assert store.get("other").payload == other_payload  # nothing else broken
    assert store.get_manifest("legal") == m  # the manifest is still readable
    report = store.verify_all()
    assert [(p.kind, p.path, p.refs) for p in report.problems] == [("corrupt", path, ("legal@1.0.0",))]
    assert snapshot(store) == before  # reading changed nothing
    store.put(m, payload)  # the cube put again from its source: a verified copy replaces the damage
    assert store.get("legal").payload == payload and store.verify_all().ok


def test_truncated_and_missing_payloads(store: CubeStore) -> None:
    m, payload = cube(size=1_000_000)
    store.put(m, payload)
    path = store.payload_path(m.digest)
    os.chmod(path, 0o644)
    os.truncate(path, 999_000)
    with pytest.raises(IntegrityError, match="truncated"):
        store.get("legal")
    assert [p.kind for p in store.verify_all().problems] == ["truncated"]
    store.put(m, payload)  # putting the cube again writes a verified copy over the damaged one
    assert store.get("legal").payload == payload and store.verify_all().ok
    os.unlink(path)
    with pytest.raises(IntegrityError, match="missing"):
        store.get("legal")
    assert [p.kind for p in store.verify_all().problems] == ["missing"]
    store.put(cube(version="1.0.1", size=1_000_000)[0], payload)  # another version with these bytes
    assert store.get("legal", "1.0.0").payload == payload
    assert store.verify_all().ok


def test_damaged_manifest_row_is_an_integrity_error(store: CubeStore) -> None:
    m, payload = cube()
    store.put(m, payload)
    with sqlite3.connect(store.index_path) as conn:
        conn.execute("UPDATE cubes SET manifest = ? WHERE cube_id = 'legal'", (b"\xff\xff garbage",))
    with pytest.raises(IntegrityError, match="damaged"):
        store.get("legal")
    assert [p.kind for p in store.verify_all().problems] == ["bad_manifest"]


def test_damaged_or_newer_index_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "s"
    with CubeStore(root) as s:
        s.put(*cube())
    with sqlite3.connect(root / "index.sqlite") as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(StorageError, match="schema version 99"):
        CubeStore(root)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "index.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StorageError, match="damaged"):
        CubeStore(junk)
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(StorageError, match="not a directory"):
        CubeStore(tmp_path / "file")


def test_closed_store_says_so(root: Path) -> None:
    s = CubeStore(root)
    s.close()
    s.close()
    with pytest.raises(StorageError, match="closed"):
        s.list()


# -- lifecycle ----------------------------------------------------------------------------------------


def test_lifecycle_is_recorded(store: CubeStore) -> None:
    store.put(*cube())
    assert store.set_lifecycle("legal", "1.0.0", "activated", "scheduler loaded it") == (GENERATED, ACTIVATED)
    assert store.set_lifecycle("legal", "1.0.0", ACTIVATED, "again") == (ACTIVATED, ACTIVATED)  # no-op
    assert store.set_lifecycle("legal", "1.0.0", "ARCHIVED", "unused for 30 days") == (ACTIVATED, ARCHIVED)
    assert store.get_manifest("legal").lifecycle == ARCHIVED
    assert store.get("legal").manifest.lifecycle == ARCHIVED
    history = store.lifecycle_history("legal", "1.0.0")
    assert [(e.from_name, e.to_name, e.reason) for e in history] == [
        ("unspecified", "generated", "stored"),
        ("generated", "activated", "scheduler loaded it"),
        ("activated", "archived", "unused for 30 days"),
    ]
    assert history[0].at <= history[1].at <= history[2].at and history[0].at.tzinfo is not None
    with pytest.raises(InvalidArgumentError):
        store.set_lifecycle("legal", "1.0.0", "melted")
    with pytest.raises(InvalidArgumentError):
        store.set_lifecycle("legal", "1.0.0", 42)
    with pytest.raises(NotFoundError):
        store.set_lifecycle("legal", "9.0.0", "activated")
    with pytest.raises(NotFoundError):
        store.lifecycle_history("legal", "9.0.0")


# -- sharing, deletion, gc ----------------------------------------------------------------------------


def test_shared_payload_stored_once_and_kept_on_delete(store: CubeStore) -> None:
    m1, payload = cube(version="1.0.0")
    m2, _ = cube(version="1.0.1")  # same bytes, new version (e.g. metadata-only release)
    store.put(m1, payload)
    store.put(m2, payload)
    path = store.payload_path(m1.digest)
    assert len([p for p in (store.root / "objects").rglob("*") if p.is_file()]) == 1
    assert store.get_by_digest(m1.digest).manifest.version == "1.0.0"  # the one stored first
    assert store.delete("legal", "1.0.0") is False  # still used by 1.0.1
    assert path.exists() and store.get("legal").payload == payload
    with pytest.raises(NotFoundError):
        store.lifecycle_history("legal", "1.0.0")
    assert store.delete("legal", "1.0.1") is True
    assert not path.exists() and not store.has("legal")
    with pytest.raises(NotFoundError):
        store.delete("legal", "1.0.1")
    assert store.verify_all().ok and store.verify_all().orphans == []


def test_gc_removes_orphans_and_dead_temp_files(store: CubeStore) -> None:
    m, payload = cube()
    store.put(m, payload)
    orphan = store.payload_path("sha256:" + "ab" * 32)
    orphan.write_bytes(b"left by a writer killed before its commit")
    foreign = store.root / "objects" / "ab" / "README"
    foreign.write_text("not ours")
    # A temp file whose writer is gone: a pid that is not running, and no lock held.
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = store.root / "tmp" / f"{dead.stdout.strip()}-0123456789abcdef.part"
    stale.write_bytes(b"partial")
    # A temp file of a live writer (this process holds its lock): must survive.
    live = store_files.TempFile(store.root / "tmp")
    try:
        assert store.verify_all().orphans == [orphan]
        report = store.gc()
        assert report.removed_orphans == [orphan] and report.removed_temp == [stale]
        assert report.foreign == [foreign] and foreign.exists()
        assert report.bytes_freed == len(b"left by a writer killed before its commit")
        assert live.path.exists()
        assert store.get("legal").payload == payload
    finally:
        live.discard()


# -- crashes ------------------------------------------------------------------------------------------


def start_writer(root: Path, *args: object, start_at: float = 0.0) -> subprocess.Popen[str]:
    """Run tests/helpers/store_writer.py; with ``start_at``, its work begins at that time.time()."""
    return subprocess.Popen(
        [sys.executable, str(WRITER), str(root), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "MEMFED_TEST_START_AT": str(start_at)},
    )


def put_times(out: str) -> list[float]:
    """The completion times a "loop" writer printed, one per put."""
    return [float(line.split()[2]) for line in out.splitlines() if line.startswith("PUT ")]


def kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.mark.parametrize("point", ["mid_write", "before_rename", "before_commit", "after_commit"])
def test_kill_9_at_each_step_of_a_put(root: Path, point: str) -> None:
    with CubeStore(root) as s:
        old_m, old_payload = cube("old", size=500_000, seed=3)
        s.put(old_m, old_payload)
    size = 16 * 1024 * 1024
    proc = start_writer(root, "pause", point, "victim", size, 11)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line.strip() == f"PAUSED {point}", proc.stderr.read()  # type: ignore[union-attr]
        # The writer really is where the test says: a temp file, then a payload file without a row.
        temp_files = list((root / "tmp").iterdir())
        assert len(temp_files) == (1 if point in ("mid_write", "before_rename") else 0)
        if point == "mid_write":
            assert temp_files[0].stat().st_size == size // 2
        payload_files = [p for p in (root / "objects").rglob("*") if p.is_file()]
        assert len(payload_files) == (1 if point in ("mid_write", "before_rename") else 2)
    finally:
        kill(proc)

    with CubeStore(root) as s:  # reopening sweeps temp files whose writer died
        assert list((root / "tmp").iterdir()) == []
        assert s.get("old").payload == old_payload  # the old state is intact
        report = s.verify_all()
        assert report.ok, report.problems
        if point == "after_commit":
            victim = s.get("victim")  # the new state is complete
            assert len(victim.payload) == size
            assert report.orphans == []
        else:
            assert not s.has("victim")  # the old state: no half cube
            expected_orphans = 1 if point == "before_commit" else 0
            assert len(report.orphans) == expected_orphans
            assert len(s.gc().removed_orphans) == expected_orphans
        assert s.verify_all().orphans == []
        # The store works normally afterwards, including for the version the dead writer tried.
        m, payload = cube("victim", size=1000, seed=12)
        if not s.has("victim"):
            s.put(m, payload)
        assert s.verify_all().ok


def test_kill_9_at_random_moments_of_a_busy_writer(root: Path) -> None:
    rng = random.Random(1)
    for round_ in range(4):
        proc = start_writer(root, "loop", f"r{round_}", 50, 3 * 1024 * 1024, round_ * 1000)
        try:
            proc.stdout.readline()  # type: ignore[union-attr]  # first put done: the writer is in its loop
            time.sleep(rng.uniform(0.0, 0.25))
        finally:
            kill(proc)
        with CubeStore(root) as s:
            for m in s.list():  # everything the index lists is complete and correct
                assert payload_digest(s.get(m.cube_id, m.version).payload) == m.digest
            assert s.verify_all().ok
            s.gc()
            assert list((root / "tmp").iterdir()) == [] and s.verify_all().orphans == []


# -- concurrency --------------------------------------------------------------------------------------


def test_two_processes_writing_at_once(root: Path) -> None:
    CubeStore(root).close()
    # Both writers put 12 cubes; seeds 0..11 in both, so every payload is shared between the two
    # processes and their puts race on the same payload files as well as on the index.
    start_at = time.time() + 2.0  # both have imported and opened the store by then
    procs = [start_writer(root, "loop", name, 12, 1_500_000, 0, start_at=start_at) for name in ("p", "q")]
    spans = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        times = put_times(out)
        assert len(times) == 12
        spans.append((times[0], times[-1]))
    assert max(first for first, _ in spans) < min(last for _, last in spans)  # they did overlap
    with CubeStore(root) as s:
        assert len(s.list()) == 24
        assert s.verify_all().ok
        files = [p for p in (root / "objects").rglob("*") if p.is_file()]
        assert len(files) == 12
        for i in range(12):
            assert s.get(f"p-{i}").payload == s.get(f"q-{i}").payload
        assert s.gc().removed_orphans == []


def test_readers_while_a_writer_writes(root: Path) -> None:
    with CubeStore(root) as s:
        s.put(*cube("hot", size=2_000_000, seed=1))
    start_at = time.time() + 2.0
    writer = start_writer(root, "loop", "w", 20, 2_000_000, 100, start_at=start_at)
    readers = [start_writer(root, "read", "hot", 1.5, start_at=start_at) for _ in range(2)]
    outputs = []
    for proc in [writer, *readers]:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        outputs.append(out)
    assert len(put_times(outputs[0])) == 20
    for out in outputs[1:]:
        assert out.startswith("READS ") and int(out.split()[1]) > 0
    with CubeStore(root) as s:
        assert len(s.list("w-")) == 20 and s.verify_all().ok


def test_threads_share_one_store(store: CubeStore) -> None:
    from concurrent.futures import ThreadPoolExecutor

    cubes = [cube(f"t{i}", size=700_000, seed=i) for i in range(16)]

    def work(i: int) -> bytes:
        m, payload = cubes[i]
        store.put(m, payload)
        return store.get(m.cube_id).payload

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(work, range(16)))
    assert results == [p for _, p in cubes]
    assert store.verify_all().ok


# -- full disk ----------------------------------------------------------------------------------------


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """A 4 MiB tmpfs (needs root and mount permission; skipped otherwise)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = Path(tempfile.mkdtemp(prefix="memfed-small-disk-"))
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        mnt.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)  # lazily, if something holds it
        mnt.rmdir()


def test_full_disk_is_a_clear_error_and_changes_nothing(small_disk: Path) -> None:
    with CubeStore(small_disk / "store") as s:
        small_m, small_payload = cube("small", size=100_000, seed=1)
        s.put(small_m, small_payload)
        before = snapshot(s)
        m, payload = cube("big", size=6 * 1024 * 1024, seed=2)
        with pytest.raises(StorageError) as err:
            s.put(m, payload)
        assert "no space left" in str(err.value) and "free disk space" in str(err.value)
        assert snapshot(s) == before
        assert not s.has("big")
        assert s.get("small").payload == small_payload
        assert s.verify_all().ok
        # Once there is room again (a smaller cube fits), the store works.
        m2, payload2 = cube("medium", size=1_000_000, seed=3)
        s.put(m2, payload2)
        assert s.get("medium").payload == payload2


def test_full_disk_at_the_index_commit(small_disk: Path) -> None:
    """The payload fits but the index's WAL cannot grow: the payload file is taken out again."""
    with CubeStore(small_disk / "store") as s:
        s.put(*cube("small", size=1000, seed=1))
        before = snapshot(s)
        size = 200_000
        free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
        filler = small_disk / "filler"
        filler.write_bytes(bytes(free - size - 4096))  # room for the payload, not for the WAL frames
        with pytest.raises(StorageError, match="disk full"):
            s.put(*cube("big", size=size, seed=2))
        assert snapshot(s) == before and not s.has("big") and s.verify_all().ok
        filler.unlink()
        s.put(*cube("big", size=size, seed=2))
        assert s.has("big")
