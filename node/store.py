"""The cube store: content-addressed payload files plus a SQLite index of manifests and lifecycle.

Layout under the store's root::

    objects/ab/cdef...   payload (safetensors bytes), named by the hex SHA-256 in the manifest; mode 0444
    tmp/                 payloads being written: <pid>-<random>.part, locked by their writer
    index.sqlite         manifests, lifecycle state and history (WAL; see memfed.node.store_index)

Crash safety. A put goes: write a temp file and fsync it while hashing it → check digest and size →
(index write lock) rename it into objects/ → fsync the directory → insert the row → commit. A process
killed anywhere before the commit leaves the old state: the row does not exist, and what is left is a
temp file (removed on the next open, since its writer's lock is gone) or an orphan payload (removed by
``gc()``). Killed after the commit, the new state is complete and durable. Every change to objects/
(rename in, unlink) happens while holding the index's write lock, so ``gc()`` and ``delete()`` never
race a writer that has renamed its file but not yet committed its row.

Verification. Every byte that comes in or goes out is hashed on the way (``put`` while writing, ``get``
while reading, overlapped on a worker thread), so a payload is never stored unless its SHA-256 is the
manifest's digest, and never returned unless it is those same bytes: a put records a local check
(XXH3-128) of the bytes it checked, and a get verifies that (memfed.node.store_files says why two).

Concurrency. Any number of processes and threads may open the same store: readers never block (WAL),
writers queue on SQLite's lock for ``busy_timeout_s``, and the slow part of a put (writing and syncing
the payload) happens outside that lock, so concurrent puts overlap their I/O.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from memfed.cube import MemCube, manifest_from_bytes, manifest_to_bytes, ref_string, validate_manifest
from memfed.cube.digest import check_digest_string, digest_hex
from memfed.cube.manifest import (
    LIFECYCLE_NAMES,
    CubeManifest,
    check_cube_id,
    lifecycle_name,
    parse_semver,
    semver_key,
)
from memfed.errors import (
    AlreadyExistsError,
    IntegrityError,
    InvalidArgumentError,
    MemfedError,
    NotFoundError,
    StorageError,
)
from memfed.node import store_files as files
from memfed.node.store_index import DEFAULT_BUSY_TIMEOUT_S, CubeRow, StoreIndex, storage_error

Buffer = bytes | bytearray | memoryview
INDEX_NAME = "index.sqlite"

__all__ = ["CubeStore", "GcReport", "LifecycleEvent", "StoreProblem", "VerifyReport"]


@dataclass(frozen=True)
class LifecycleEvent:
    """One recorded lifecycle transition. States are ``memfed.mip.v1.LifecycleState`` numbers; the put
    that created the cube is recorded as a transition from 0 (UNSPECIFIED)."""

    cube_id: str
    version: str
    from_state: int
    to_state: int
    at: datetime
    reason: str

    @property
    def from_name(self) -> str:
        return lifecycle_name(self.from_state)

    @property
    def to_name(self) -> str:
        return lifecycle_name(self.to_state)


@dataclass
class GcReport:
    """What ``gc()`` removed, and what it found but left alone."""

    removed_temp: list[Path] = field(default_factory=list)
    removed_orphans: list[Path] = field(default_factory=list)
    bytes_freed: int = 0
    foreign: list[Path] = field(default_factory=list)  # files in objects/ that are not payload names


@dataclass(frozen=True)
class StoreProblem:
    """One thing ``verify_all`` found wrong. ``kind``: missing | truncated | corrupt | unreadable |
    bad_manifest | index."""

    kind: str
    detail: str
    path: Path | None = None
    refs: tuple[str, ...] = ()


@dataclass
class VerifyReport:
    """Result of ``verify_all``: ``ok`` when every indexed payload is present and hashes to its digest.

    Orphans (payload files no row references) are listed but are not problems: ``gc()`` removes them.
    """

    checked_payloads: int = 0
    checked_bytes: int = 0
    problems: list[StoreProblem] = field(default_factory=list)
    orphans: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _state_number(state: str | int) -> int:
    if isinstance(state, str):
        if state.lower() not in LIFECYCLE_NAMES:
            raise InvalidArgumentError(
                f"unknown lifecycle state {state!r}", hint=f"use one of: {', '.join(LIFECYCLE_NAMES)}"
            )
        return LIFECYCLE_NAMES[state.lower()]
    if state not in LIFECYCLE_NAMES.values():
        raise InvalidArgumentError(f"unknown lifecycle state number {state}")
    return int(state)


def _describe_os_error(
    exc: OSError, doing: str, *, needed: int | None = None, outcome: str = "the store was not changed"
) -> StorageError:
    """A StorageError that says what failed, while doing what, what became of the store, and what the
    user can do."""
    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        need = f" (the payload needs {needed:,} bytes)" if needed is not None else ""
        return StorageError(
            f"no space left on device while {doing}{where}; {outcome}",
            hint=f"free disk space{need} and retry",
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageError(
            f"cannot write while {doing}{where}: {exc.strerror}; {outcome}",
            hint="check the store directory's permissions and that its filesystem is mounted read-write",
        )
    if exc.errno == errno.EIO:
        return StorageError(
            f"I/O error while {doing}{where}; {outcome}",
            hint="the disk may be failing: check the system log, then run verify_all()",
        )
    return StorageError(f"{exc.strerror or exc} while {doing}{where}; {outcome}")


class CubeStore:
    """Content-addressed cube payloads plus a SQLite index of manifests and lifecycle state.

    Safe to use from several threads (index access is serialized, payload I/O is not) and from several
    processes at once. Use as a context manager, or call ``close()``.
    """

    def __init__(
        self, root: Path | str, *, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S, synchronous: str = "FULL"
    ) -> None:
        """Open (creating if needed) the store at ``root``.

        ``busy_timeout_s``: how long a write waits for another process's write lock before StorageError.
        ``synchronous``: "FULL" (a returned write survives power loss) or "NORMAL" (survives a killed
        process; a power cut may roll back the last writes, never corrupt); see memfed.node.store_index.
        """
        self.root = Path(root)
        self.objects_dir = self.root / "objects"
        self.tmp_dir = self.root / "tmp"
        self.index_path = self.root / INDEX_NAME
        self._index_options: dict[str, Any] = {"busy_timeout_s": busy_timeout_s, "synchronous": synchronous}
        try:
            self._prepare_layout()
        except OSError as exc:
            raise _describe_os_error(exc, f"creating the cube store at {self.root}") from exc
        self._lock = threading.RLock()
        self._pid = os.getpid()
        self._index: StoreIndex | None = StoreIndex(self.index_path, **self._index_options)
        # Cheap part of gc on every open: temp files whose writer died. Orphan payloads need a scan of
        # objects/ under the write lock, so they wait for an explicit gc().
        try:
            self.last_swept_temp = files.sweep_temp(self.tmp_dir)
        except OSError:  # never refuse to open over housekeeping; gc() reports such errors
            self.last_swept_temp = []

    def _prepare_layout(self) -> None:
        """Create root, tmp/ and all 256 objects/xx/ directories, durably, once per store.

        Creating a prefix directory on demand would cost a put one more directory fsync (a journal
        commit, as dear as the payload's own fsync for a small cube) every time a new prefix appears.
        """
        if self.root.exists() and not self.root.is_dir():
            raise StorageError(f"cube store root {self.root} is not a directory")
        if (self.objects_dir / "ff").is_dir() and self.tmp_dir.is_dir():
            return  # laid out already
        self.root.mkdir(parents=True, exist_ok=True)
        for d in (self.objects_dir, self.tmp_dir):
            d.mkdir(exist_ok=True)
        for i in range(256):
            (self.objects_dir / f"{i:02x}").mkdir(exist_ok=True)
        files.fsync_dir(self.objects_dir)
        files.fsync_dir(self.root)
        files.fsync_dir(self.root.parent)

    # -- lifecycle of the store object ---------------------------------------------------------------

    def close(self) -> None:
        """Close the index connection. Idempotent."""
        with self._lock:
            if self._index is not None and self._pid == os.getpid():
                self._index.close()
            self._index = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CubeStore({str(self.root)!r})"

    def _idx(self) -> StoreIndex:
        """The index connection of this process (reopened after a fork: SQLite connections must not
        cross fork). Call with ``self._lock`` held."""
        if self._index is None:
            raise StorageError(f"cube store {self.root} is closed", hint="open a new CubeStore")
        if self._pid != os.getpid():
            self._index = StoreIndex(self.index_path, **self._index_options)
            self._pid = os.getpid()
        return self._index

    @contextmanager
    def _indexed(self, doing: str) -> Iterator[StoreIndex]:
        """The index, with this object's lock held and SQLite errors turned into StorageError."""
        with self._lock:
            try:
                yield self._idx()
            except sqlite3.Error as exc:
                raise storage_error(exc, self.index_path, doing) from exc

    # -- paths ---------------------------------------------------------------------------------------

    def payload_path(self, digest: str) -> Path:
        """Where the payload with this digest lives (whether or not it exists)."""
        hexd = digest_hex(digest)
        return self.objects_dir / hexd[:2] / hexd[2:]

    # -- writing -------------------------------------------------------------------------------------

    def put(self, manifest: CubeManifest, payload: Buffer) -> CubeManifest:
        """Store one cube version; return the manifest as stored.

        The payload is hashed while it is written, and nothing is kept unless its SHA-256 and size are
        the manifest's (else IntegrityError). Putting the same manifest and payload again changes no
        index entry (and repairs the stored payload file if it was damaged); the same
        ``cube_id@version`` with another digest or other metadata raises AlreadyExistsError. A payload
        shared by several versions is stored once. The caller must not modify ``payload`` while this
        runs.
        """
        m = self._checked_manifest(manifest)
        try:
            view = memoryview(payload).cast("B")
        except TypeError as exc:
            raise InvalidArgumentError(
                f"payload of cube {ref_string(m)} must be bytes-like, not {type(payload).__name__}"
            ) from exc
        self._check_size(m, len(view))

        def write(fd: int) -> tuple[int, tuple[bytes, bytes]]:
            return len(view), files.write_hashed_synced(fd, view)

        return self._put(m, write)

    def put_stream(self, manifest: CubeManifest, chunks: Iterable[Buffer]) -> CubeManifest:
        """Like ``put`` for a payload that arrives in chunks (decryption, network), never held whole.

        A chunk's buffer must not be reused until the chunk after the next one has been yielded.
        """
        m = self._checked_manifest(manifest)

        def write(fd: int) -> tuple[int, tuple[bytes, bytes]]:
            return files.write_hashed_chunks_synced(fd, chunks)

        return self._put(m, write)

    def _checked_manifest(self, manifest: CubeManifest) -> CubeManifest:
        if not isinstance(manifest, CubeManifest):
            raise InvalidArgumentError(f"expected a CubeManifest, got {type(manifest).__name__}")
        validate_manifest(manifest)
        m = CubeManifest()
        m.CopyFrom(manifest)  # never alias the caller's message
        return m

    @staticmethod
    def _check_size(m: CubeManifest, size: int) -> None:
        if size != m.payload.size_bytes:
            raise IntegrityError(
                f"payload of cube {ref_string(m)} is {size:,} bytes but its manifest says "
                f"{m.payload.size_bytes:,}; nothing was stored",
                hint="the payload is truncated or belongs to another manifest",
            )

    def _put(self, m: CubeManifest, write: Callable[[int], tuple[int, tuple[bytes, bytes]]]) -> CubeManifest:
        ref = ref_string(m)
        # 1. Without the write lock: a conflicting version fails before any I/O; then the payload goes
        #    to a temp file, hashed on the way, fsynced, and checked.
        with self._indexed(f"storing cube {ref}") as idx, idx.read():
            row = idx.row(m.cube_id, m.version)
        if row is not None:
            self._check_same(row, m)
        temp, local_check = self._write_temp(m, write, bytes.fromhex(digest_hex(m.digest)))
        # 2. Under the write lock: re-check, move the payload in, commit the row.
        try:
            return self._install(m, temp, self.payload_path(m.digest), local_check)
        finally:
            temp.discard()  # a no-op unlink once renamed; closes the descriptor (drops its lock)

    def _write_temp(
        self, m: CubeManifest, write: Callable[[int], tuple[int, tuple[bytes, bytes]]], expected: bytes
    ) -> tuple[files.TempFile, bytes]:
        """Write the payload to a locked temp file while hashing it, fsync it, check it; return the
        file and the local check (XXH3-128) of its bytes."""
        doing = f"writing the payload of cube {ref_string(m)} into {self.tmp_dir}"
        try:
            temp = files.TempFile(self.tmp_dir)
        except OSError as exc:
            raise _describe_os_error(exc, doing, needed=m.payload.size_bytes) from exc
        try:
            size, (actual, local_check) = write(temp.fileno())  # fsyncs too
            self._check_size(m, size)
            if actual != expected:
                raise self._digest_mismatch(m)
        except OSError as exc:
            temp.discard()
            raise _describe_os_error(exc, doing, needed=m.payload.size_bytes) from exc
        except BaseException:
            temp.discard()
            raise
        return temp, local_check

    @staticmethod
    def _digest_mismatch(m: CubeManifest) -> IntegrityError:
        return IntegrityError(
            f"payload of cube {ref_string(m)} does not hash to its manifest's digest {m.digest}; "
            "nothing was stored",
            hint="the payload was corrupted or tampered with in transit, or belongs to another manifest",
        )

    def _install(self, m: CubeManifest, temp: files.TempFile, obj: Path, local_check: bytes) -> CubeManifest:
        """Phase 2 of a put, under the index write lock. See the module docstring for the order.

        The verified temp file always replaces whatever is at the payload's path, even when the store
        holds that payload already (same bytes, for another version, or this one put again): a put
        of a cube whose stored copy was damaged or lost on disk thereby repairs it. The replaced copy
        stays valid until the rename, and ours is fsynced before it, so no row ever sees a gap.

        The transaction is driven by hand (not ``idx.write()``) because a failed commit must remove
        the payload file this put renamed in *before* the write lock is released.
        """
        ref = ref_string(m)
        with self._indexed(f"storing cube {ref}") as idx:
            installed_new = False
            try:
                idx.begin_write()
                row = idx.row(m.cube_id, m.version)
                if row is not None:  # put again, or a concurrent put of the same version won
                    self._check_same(row, m)
                shared = idx.digest_referenced(m.digest)
                files.make_dir_durable(obj.parent)  # normally there already (see _prepare_layout)
                os.rename(temp.path, obj)
                installed_new = not shared  # only a file no row uses may be taken out again
                files.fsync_dir(obj.parent)
                if row is not None:
                    idx.rollback()  # nothing to change in the index
                    return self._parse(row)
                idx.insert(
                    cube_id=m.cube_id,
                    version=m.version,
                    digest=m.digest,
                    kind=m.kind,
                    lifecycle=m.lifecycle,
                    priority=m.priority,
                    size=m.payload.size_bytes,
                    local_check=local_check,
                    created_at=m.created_at.ToDatetime(tzinfo=UTC).isoformat(),
                    manifest=manifest_to_bytes(m),
                    reason="stored",
                )
                idx.commit()
            except BaseException as exc:
                if installed_new:
                    with contextlib.suppress(OSError):
                        os.unlink(obj)  # if this fails too: an orphan, which gc() removes
                idx.rollback()
                if isinstance(exc, OSError):
                    raise _describe_os_error(exc, f"storing cube {ref}") from exc
                raise
        return m

    def _check_same(self, row: CubeRow, m: CubeManifest) -> None:
        """An existing version may only be put again unchanged (lifecycle aside: that is local state)."""
        ref = ref_string(m)
        if row.digest != m.digest:
            raise AlreadyExistsError(
                f"cube {ref} already exists with another payload ({row.digest}, not {m.digest})",
                hint="versions are immutable: publish the change as a new version",
            )
        stored = self._parse(row)
        stored.lifecycle = m.lifecycle
        if manifest_to_bytes(stored) != manifest_to_bytes(m):
            raise AlreadyExistsError(
                f"cube {ref} already exists with the same payload but other metadata",
                hint="versions are immutable: publish the change as a new version",
            )

    # -- reading -------------------------------------------------------------------------------------

    def get(self, cube_id: str, version: str | None = None) -> MemCube:
        """The cube ``cube_id@version`` (the newest version by semver when ``version`` is None), its
        payload read and verified against the manifest's digest."""
        row = self._find(cube_id, version)
        m = self._parse(row)
        return MemCube(m, self._read_payload(row, m))

    def get_manifest(self, cube_id: str, version: str | None = None) -> CubeManifest:
        """The stored manifest (with the current lifecycle state), without touching the payload."""
        return self._parse(self._find(cube_id, version))

    def get_by_digest(self, digest: str) -> MemCube:
        """The cube whose payload has this digest. When several versions share the payload, the
        manifest is the one stored first."""
        try:
            check_digest_string(digest)
        except MemfedError as exc:
            raise InvalidArgumentError(exc.message, hint=exc.hint) from exc
        with self._indexed(f"looking up payload {digest}") as idx, idx.read():
            rows = idx.rows_by_digest(digest)
        if not rows:
            raise NotFoundError(f"no cube in store {self.root} has payload {digest}")
        m = self._parse(rows[0])
        return MemCube(m, self._read_payload(rows[0], m))

    def has(self, cube_id: str, version: str | None = None) -> bool:
        """Whether the store holds ``cube_id@version`` (any version when ``version`` is None)."""
        with self._indexed(f"looking up cube {cube_id}") as idx:
            if version is None:
                return bool(idx.versions(cube_id))
            return idx.row(cube_id, version) is not None

    def versions(self, cube_id: str) -> builtins.list[str]:
        """All stored versions of a cube, oldest first by semver ([] when none)."""
        with self._indexed(f"listing the versions of {cube_id}") as idx:
            found = idx.versions(cube_id)
        return sorted(found, key=_version_order)

    def list(
        self, cube_id_prefix: str | None = None, states: Iterable[str | int] | None = None
    ) -> builtins.list[CubeManifest]:
        """Manifests of stored cubes, by cube id then semver; optionally only ids starting with
        ``cube_id_prefix`` and only the given lifecycle states."""
        numbers = None if states is None else [_state_number(s) for s in states]
        with self._indexed("listing cubes") as idx, idx.read():
            rows = idx.rows(cube_id_prefix, numbers)
        rows.sort(key=lambda r: (r.cube_id, _version_order(r.version)))
        return [self._parse(r) for r in rows]

    def _find(self, cube_id: str, version: str | None) -> CubeRow:
        try:
            check_cube_id(cube_id)
            if version is not None:
                parse_semver(version)
        except MemfedError as exc:
            raise InvalidArgumentError(exc.message, hint=exc.hint) from exc
        with self._indexed(f"looking up cube {cube_id}") as idx, idx.read():
            if version is None:
                found = idx.versions(cube_id)
                if not found:
                    raise NotFoundError(f"no cube {cube_id!r} in store {self.root}")
                version = max(found, key=_version_order)
            row = idx.row(cube_id, version)
        if row is None:
            raise NotFoundError(f"no cube {cube_id}@{version} in store {self.root}")
        return row

    def _parse(self, row: CubeRow) -> CubeManifest:
        ref = f"{row.cube_id}@{row.version}"
        try:
            m = manifest_from_bytes(row.manifest)
        except MemfedError as exc:
            raise IntegrityError(
                f"stored manifest of cube {ref} in {self.index_path} is damaged: {exc.message}",
                hint="delete this version and fetch it again, or restore the index from a backup",
            ) from exc
        if (m.cube_id, m.version, m.digest) != (row.cube_id, row.version, row.digest):
            raise IntegrityError(
                f"stored manifest of cube {ref} in {self.index_path} names {ref_string(m)} ({m.digest})",
                hint="the index was edited by hand or is damaged; restore it from a backup",
            )
        return m

    def _read_payload(self, row: CubeRow, m: CubeManifest) -> bytes:
        ref = f"{row.cube_id}@{row.version}"
        path = self.payload_path(row.digest)
        what_to_do = (
            "put this cube again from its source (a verified copy replaces the damaged file), or restore "
            "the file from a backup; verify_all() checks the rest of the store"
        )
        try:
            result = files.read_hashed(path, row.size)
        except FileNotFoundError:
            if not self.has(row.cube_id, row.version):
                raise NotFoundError(f"cube {ref} was deleted while it was being read") from None
            raise IntegrityError(f"payload file of cube {ref} is missing: {path}", hint=what_to_do) from None
        except files.ShortFileError as exc:
            raise IntegrityError(
                f"payload file of cube {ref} is {exc.actual:,} bytes, the index says {exc.expected:,} "
                f"(truncated or damaged): {path}",
                hint=what_to_do,
            ) from None
        except OSError as exc:
            raise StorageError(f"cannot read payload of cube {ref} from {path}: {exc.strerror}") from exc
        if result.digest != row.local_check:
            raise IntegrityError(
                f"payload file of cube {ref} is corrupt: {path} no longer holds the bytes whose digest "
                f"{m.digest} was checked when it was stored (xxh3-128 {result.digest.hex()[:16]}…, recorded "
                f"{row.local_check.hex()[:16]}…)",
                hint=what_to_do,
            )
        return result.data

    # -- lifecycle -----------------------------------------------------------------------------------

    def set_lifecycle(
        self, cube_id: str, version: str, state: str | int, reason: str = ""
    ) -> tuple[int, int]:
        """Record a lifecycle transition; return (old, new) state numbers.

        The stored manifest's ``lifecycle`` field changes with it, in the same transaction as the event.
        Which transitions are legal is not decided here (memfed.node.lifecycle does). Setting the current
        state again changes and records nothing.
        """
        new = _state_number(state)
        with self._indexed(f"setting the lifecycle of {cube_id}@{version}") as idx, idx.write():
            row = idx.row(cube_id, version)
            if row is None:
                raise NotFoundError(f"no cube {cube_id}@{version} in store {self.root}")
            old = row.lifecycle
            if old != new:
                m = self._parse(row)
                m.lifecycle = new
                idx.update_lifecycle(cube_id, version, new, manifest_to_bytes(m))
                idx.add_event(cube_id, version, old, new, reason)
        return old, new

    def lifecycle_history(self, cube_id: str, version: str) -> builtins.list[LifecycleEvent]:
        """Every recorded transition of ``cube_id@version``, oldest first (the first is the put)."""
        with self._indexed(f"reading the history of {cube_id}@{version}") as idx, idx.read():
            if idx.row(cube_id, version) is None:
                raise NotFoundError(f"no cube {cube_id}@{version} in store {self.root}")
            events = idx.events(cube_id, version)
        return [
            LifecycleEvent(cube_id, version, f, t, datetime.fromisoformat(at), reason)
            for f, t, at, reason in events
        ]

    # -- removal -------------------------------------------------------------------------------------

    def delete(self, cube_id: str, version: str) -> bool:
        """Remove ``cube_id@version`` and its history. Its payload file is removed too unless another
        version shares it; return whether it was.

        The row goes first (committed), the file after, under a second write lock: killed in between,
        the file is an orphan for ``gc()``; never is a row left pointing at a removed file.
        """
        with self._indexed(f"deleting {cube_id}@{version}") as idx:
            with idx.write():
                row = idx.row(cube_id, version)
                if row is None:
                    raise NotFoundError(f"no cube {cube_id}@{version} in store {self.root}")
                idx.delete(cube_id, version)
            return self._remove_if_unreferenced(idx, row.digest)

    def _remove_if_unreferenced(self, idx: StoreIndex, digest: str) -> bool:
        """Unlink a payload that no row references, under the write lock; return whether it was."""
        path = self.payload_path(digest)
        try:
            with idx.write():
                if idx.digest_referenced(digest):
                    return False
                os.unlink(path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise _describe_os_error(
                exc,
                f"removing payload file {path}",
                outcome="the cube was deleted from the index; its payload file is left for gc()",
            ) from exc
        return True

    def gc(self) -> GcReport:
        """Remove temp files of dead writers and payload files that no index row references.

        Runs under the index write lock, so no put can be between its rename and its commit meanwhile.
        """
        try:
            report = GcReport(removed_temp=files.sweep_temp(self.tmp_dir))
            with self._indexed("collecting garbage") as idx, idx.write():
                referenced = idx.all_digests()
                for path, digest in self._object_files(report.foreign):
                    if digest in referenced:
                        continue
                    try:
                        size = path.stat().st_size
                        os.unlink(path)
                    except FileNotFoundError:
                        continue
                    report.removed_orphans.append(path)
                    report.bytes_freed += size
        except OSError as exc:
            raise _describe_os_error(exc, "collecting garbage", outcome="run gc() again once fixed") from exc
        return report

    def _object_files(self, foreign: builtins.list[Path]) -> Iterable[tuple[Path, str]]:
        """(path, digest) of every payload-named file in objects/; other entries go to ``foreign``."""
        hexdigits = set("0123456789abcdef")
        for prefix in sorted(os.listdir(self.objects_dir)):
            pdir = self.objects_dir / prefix
            if not (len(prefix) == 2 and set(prefix) <= hexdigits and pdir.is_dir()):
                foreign.append(pdir)
                continue
            for name in sorted(os.listdir(pdir)):
                if len(name) == 62 and set(name) <= hexdigits:
                    yield pdir / name, f"sha256:{prefix}{name}"
                else:
                    foreign.append(pdir / name)

    # -- checking ------------------------------------------------------------------------------------

    def verify_all(self) -> VerifyReport:
        """Check the whole store (fsck): the index file's own consistency, every manifest, and that every
        referenced payload exists and hashes to its digest. Changes nothing."""
        report = VerifyReport()
        with self._indexed("verifying the store") as idx, idx.read():
            for line in idx.quick_check():
                report.problems.append(StoreProblem("index", line, self.index_path))
            rows = idx.rows(None, None)
        by_digest: dict[str, builtins.list[CubeRow]] = {}
        for row in rows:
            try:
                self._parse(row)
            except IntegrityError as exc:
                report.problems.append(
                    StoreProblem(
                        "bad_manifest", exc.message, self.index_path, (f"{row.cube_id}@{row.version}",)
                    )
                )
            by_digest.setdefault(row.digest, []).append(row)
        for digest, users in sorted(by_digest.items()):
            refs = tuple(f"{r.cube_id}@{r.version}" for r in users)
            path = self.payload_path(digest)
            expected_size = users[0].size
            try:
                size, raw = files.hash_file(path)
            except FileNotFoundError:
                report.problems.append(
                    StoreProblem("missing", f"payload file missing for {digest}", path, refs)
                )
                continue
            except OSError as exc:
                report.problems.append(StoreProblem("unreadable", f"{exc.strerror}", path, refs))
                continue
            report.checked_payloads += 1
            report.checked_bytes += size
            if size != expected_size:
                report.problems.append(
                    StoreProblem("truncated", f"{size:,} bytes, the index says {expected_size:,}", path, refs)
                )
            elif raw.hex() != digest_hex(digest):
                report.problems.append(
                    StoreProblem("corrupt", f"hashes to sha256:{raw.hex()}, expected {digest}", path, refs)
                )
        report.orphans = [p for p, d in self._object_files([]) if d not in by_digest]
        return report


def _version_order(version: str) -> tuple[tuple[int, int, int, int, str], str]:
    """semver order; the raw string breaks ties between versions that differ only in build metadata."""
    try:
        return semver_key(version), version
    except MemfedError:  # a hand-edited index; sort it first rather than fail every lookup
        return (-1, -1, -1, -1, ""), version
