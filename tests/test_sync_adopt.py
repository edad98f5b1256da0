"""``CubeStore.adopt_file``: how a sync receiver hands the store the payload file it wrote and hashed
while the cube arrived, so the bytes are written once. A refused file leaves the store as it was."""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash

from memfed.cube import new_manifest, payload_digest
from memfed.errors import AlreadyExistsError, IntegrityError
from memfed.node.store import CubeStore


def _cube(version: str = "1.0.0", size: int = 3 * 1024 * 1024 + 17, seed: int = 0):  # type: ignore[no-untyped-def]
    payload = random.Random(seed).randbytes(size)
    m = new_manifest(cube_id="notes", version=version, kind="plaintext", digest=payload_digest(payload),
                     size_bytes=size)  # fmt: skip
    return m, payload


def _written(path: Path, payload: bytes) -> tuple[bytes, bytes]:
    path.write_bytes(payload)
    os.chmod(path, 0o600)
    return hashlib.sha256(payload).digest(), xxhash.xxh3_128(payload).digest()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[CubeStore]:
    with CubeStore(tmp_path / "store") as s:
        yield s


def _state(s: CubeStore) -> tuple[list[bytes], list[str]]:
    files = sorted(str(p.relative_to(s.root)) for sub in ("objects", "tmp") for p in (s.root / sub).rglob("*")
                   if p.is_file())  # fmt: skip
    return [m.SerializeToString(deterministic=True) for m in s.list()], files


def test_adopts_a_file_from_another_directory_and_commits_its_row(store: CubeStore, tmp_path: Path) -> None:
    m, payload = _cube()
    src = tmp_path / "elsewhere" / "notes.payload.part"
    src.parent.mkdir()
    sha, check = _written(src, payload)
    stored = store.adopt_file(m, src, sha, check)
    assert stored.digest == m.digest and not src.exists()
    obj = store.payload_path(m.digest)
    assert obj.stat().st_mode & 0o777 == 0o444  # read-only like every stored payload
    assert store.get("notes", "1.0.0").payload == payload  # the get verifies the recorded local check
    with store._indexed("test") as idx, idx.read():
        row = idx.row("notes", "1.0.0")
    assert row is not None and row.local_check == check and row.digest == m.digest and not row.cold
    assert store.verify_all().ok
    assert not list(store.tmp_dir.iterdir())
    # The same version again, from another file: nothing changes, the file is consumed.
    again = tmp_path / "again.part"
    store.adopt_file(m, again, *_written(again, payload))
    assert not again.exists() and [x.version for x in store.list()] == ["1.0.0"]


def test_digest_mismatch_is_refused_and_changes_nothing(store: CubeStore, tmp_path: Path) -> None:
    m0, p0 = _cube("0.9.0", seed=1)
    store.put(m0, p0)
    before = _state(store)
    m, payload = _cube()
    src = tmp_path / "bad.part"
    damaged = bytearray(payload)
    damaged[12345] ^= 1
    sha, check = _written(src, bytes(damaged))  # the receiver's hashes of what it actually wrote
    with pytest.raises(IntegrityError, match="does not hash to its manifest's digest"):
        store.adopt_file(m, src, sha, check)
    assert _state(store) == before and not store.has("notes", "1.0.0")
    assert src.read_bytes() == bytes(damaged) and src.stat().st_mode & 0o777 == 0o600  # left as it was
    # A file of the wrong size (claimed hashes right) is refused too, before anything moves.
    short = tmp_path / "short.part"
    short.write_bytes(payload[:-1])
    with pytest.raises(IntegrityError, match="bytes but its manifest says"):
        store.adopt_file(m, short, hashlib.sha256(payload).digest(), xxhash.xxh3_128(payload).digest())
    assert _state(store) == before and short.exists()


def test_conflicting_version_is_refused(store: CubeStore, tmp_path: Path) -> None:
    m, payload = _cube()
    store.put(m, payload)
    other, other_payload = _cube(seed=2)  # same cube@version, other bytes
    src = tmp_path / "other.part"
    with pytest.raises(AlreadyExistsError):
        store.adopt_file(other, src, *_written(src, other_payload))
    assert src.exists() and store.get("notes", "1.0.0").payload == payload


def test_another_filesystem_is_copied_and_checked(store: CubeStore) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(store.tmp_dir).st_dev:
        pytest.skip("no second filesystem (/dev/shm) to adopt from")
    m, payload = _cube()
    src = shm / f"memfed-adopt-{os.getpid()}.part"
    try:
        sha, check = _written(src, payload)
        store.adopt_file(m, src, sha, check)
        assert not src.exists() and store.get("notes", "1.0.0").payload == payload
        assert not list(store.tmp_dir.iterdir())
        # Hashes that do not match the file's bytes are caught by the copy's own hashing.
        m2, p2 = _cube("2.0.0", seed=3)
        sha2, _ = _written(src, p2)
        with pytest.raises(IntegrityError, match="changed while it was adopted"):
            store.adopt_file(m2, src, sha2, b"\0" * 16)
        assert not store.has("notes", "2.0.0") and not list(store.tmp_dir.iterdir()) and src.exists()
    finally:
        src.unlink(missing_ok=True)
