"""The cube store: content-addressed payload files plus a SQLite index of manifests and lifecycle.

Layout under the store's root::

    objects/ab/cdef...   payload (safetensors bytes), named by the hex SHA-256 in the manifest; mode 0444
    cold/ab/cdef....gz   archived payload: the same bytes gzip-compressed (created on first archive)
    tmp/                 payloads being written: <pid>-<random>.part, locked by their writer
    index.sqlite         manifests, lifecycle state and history (WAL; see memfed.node.store_index)

Crash safety. A put goes: write a temp file and fsync it while hashing it → check digest and size →
(index write lock) rename it into objects/ → fsync the directory → insert the row → commit. A process
killed anywhere before the commit leaves the old state: the row does not exist, and what is left is a
temp file (removed on the next open, since its writer's lock is gone) or an orphan payload (removed by
``gc()``). Killed after the commit, the new state is complete and durable. Every change to objects/
(rename in, unlink) happens while holding the index's write lock, so ``gc()`` and ``delete()`` never
race a writer that has renamed its file but not yet committed its row. ``adopt_file`` is a put whose
temp file the caller wrote (and hashed) elsewhere: it is fsynced and renamed in the same way.

Cold storage. Each index row says where its payload lives (``cold``): objects/ or cold/, never both
as far as the row is concerned. ``archive_payload`` and ``restore_payload`` move a payload between the
two the way a put moves one in: the new copy is written to tmp/ (verified against the digest while it
is written) and fsynced, renamed into place and the row switched and committed under the write lock,
and only then is the old copy removed, if no other row still expects it there. Killed before the
commit, the row still names the old copy, which is intact; the new one is an orphan. Killed after, the
old copy is the orphan. ``gc()`` removes orphans of both kinds, and ``verify_all`` checks each row's
payload where the row says it is. memfed.node.lifecycle decides when payloads move.

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
import hashlib
import os
import sqlite3
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Self

import xxhash

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
    LifecycleError,
    MemfedError,
    NotFoundError,
    StorageError,
)
from memfed.node import store_files as files
from memfed.node.store_index import DEFAULT_BUSY_TIMEOUT_S, CubeRow, StoreIndex, storage_error

Buffer = bytes | bytearray | memoryview
INDEX_NAME = "index.sqlite"
COLD_DIR = "cold"
COLD_SUFFIX = ".gz"
# zlib level of cold copies. Measured here on LoRA safetensors: level 1 and 6 compress equally (fp32
# to 0.93, bf16 to 0.80-0.81 of the size; float mantissas are noise) but 6 runs at half the speed on
# bf16 (10 against 23 MB/s). Decompression runs at ≈150 MB/s either way.
COLD_LEVEL = 1
ARCHIVED = LIFECYCLE_NAMES["archived"]
EXPIRED = LIFECYCLE_NAMES["expired"]
# States a payload in cold storage may be in: anything else needs the payload loadable.
COLD_STATES = frozenset({ARCHIVED, EXPIRED})

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
        self.cold_dir = self.root / COLD_DIR
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

    def cold_path(self, digest: str) -> Path:
        """Where the compressed cold copy of the payload with this digest lives (whether or not it does)."""
        hexd = digest_hex(digest)
        return self.cold_dir / hexd[:2] / f"{hexd[2:]}{COLD_SUFFIX}"

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
            return self._install(m, temp.path, self.payload_path(m.digest), local_check)
        finally:
            temp.discard()  # a no-op unlink once renamed; closes the descriptor (drops its lock)

    def adopt_file(
        self, manifest: CubeManifest, path: Path | str, sha256: bytes, local_check: bytes
    ) -> CubeManifest:
        """Store a cube whose payload the caller has already written to ``path``, without copying it.

        For receivers that must keep the payload in a file of their own while it arrives (a resumable
        transfer): writing it a second time into tmp/ would double the cost of the transfer's bytes.
        ``sha256`` and ``local_check`` are the raw SHA-256 and XXH3-128 of the file's bytes, computed by
        the caller as it wrote them (as ``put_stream`` does for its temp file); the store does not
        re-read the file, so the caller vouches for them. Nothing is stored unless ``sha256`` is the
        manifest's digest and the file's size its manifest's (else IntegrityError; the file is left as
        it was, and so is the store).

        Otherwise this is a put whose temp file is ``path``: the file is made read-only and fsynced,
        renamed into objects/ and its index row committed exactly as ``put`` does (same crash safety,
        same rules for a version stored already). ``path`` must be on the store's filesystem for the
        rename; on another, it is copied into tmp/ first (hashed again while copied, and refused if the
        copy's hashes differ). On success the file is gone from ``path``.
        """
        m = self._checked_manifest(manifest)
        path = Path(path)
        with self._indexed(f"storing cube {ref_string(m)}") as idx, idx.read():
            row = idx.row(m.cube_id, m.version)
        if row is not None:
            self._check_same(row, m)
        if sha256 != bytes.fromhex(digest_hex(m.digest)):
            raise self._digest_mismatch(m)
        doing = f"adopting {path} as the payload of cube {ref_string(m)}"
        temp: files.TempFile | None = None
        mode: int | None = None  # the file's mode before we made it read-only (restored on failure)
        try:
            with open(path, "rb", buffering=0) as f:
                st = os.fstat(f.fileno())
                self._check_size(m, st.st_size)
                mode = st.st_mode & 0o7777
                os.fchmod(f.fileno(), 0o444)  # a payload is immutable once stored
                same_fs = st.st_dev == os.stat(self.tmp_dir).st_dev
                if same_fs:
                    os.fsync(f.fileno())
                else:
                    temp, got = self._copy_to_temp(f)
                    if got != (m.payload.size_bytes, (sha256, local_check)):
                        raise IntegrityError(
                            f"{path} changed while it was adopted as the payload of {ref_string(m)}; "
                            "nothing was stored",
                            hint="the file must not be written to once handed to adopt_file",
                        )
            stored = self._install(m, path if temp is None else temp.path, self.payload_path(m.digest),
                                   local_check)  # fmt: skip
        except BaseException as exc:
            if mode is not None:
                with contextlib.suppress(OSError):
                    os.chmod(path, mode)  # not adopted: the caller's file as it was (if still there)
            if isinstance(exc, OSError):
                raise _describe_os_error(exc, doing, needed=m.payload.size_bytes) from exc
            raise
        finally:
            if temp is not None:
                temp.discard()
        with contextlib.suppress(OSError):
            os.unlink(path)  # copied, or not needed (an archived version); a no-op once renamed
        return stored

    def _copy_to_temp(self, f: BinaryIO) -> tuple[files.TempFile, tuple[int, tuple[bytes, bytes]]]:
        """Copy an open file into a locked temp file, hashing and fsyncing as ``put_stream`` does."""
        temp = files.TempFile(self.tmp_dir)
        try:
            buf = memoryview(bytearray(files.CHUNK))
            spare = memoryview(bytearray(files.CHUNK))

            def chunks() -> Iterator[memoryview]:
                nonlocal buf, spare
                while n := f.readinto(buf):  # type: ignore[attr-defined]
                    yield buf[:n]
                    buf, spare = spare, buf

            return temp, files.write_hashed_chunks_synced(temp.fileno(), chunks())
        except BaseException:
            temp.discard()
            raise

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

    def _install(self, m: CubeManifest, src: Path, obj: Path, local_check: bytes) -> CubeManifest:
        """Phase 2 of a put, under the index write lock: rename the verified, fsynced file ``src`` (a
        temp file, or an adopted one) to ``obj``. See the module docstring for the order.

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
                shared = idx.digest_referenced_at(m.digest, cold=False)
                if row is not None and row.cold and not shared:
                    idx.rollback()  # archived: its payload belongs in cold/, a hot copy would be an orphan
                    return self._parse(row)
                files.make_dir_durable(obj.parent)  # normally there already (see _prepare_layout)
                os.rename(src, obj)
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
        """The cube ``cube_id@version``, its payload read and verified against the manifest's digest.

        Without ``version``: the current version, i.e. the newest by semver that is neither archived
        nor expired (when every version is, the newest, which then raises as below). An archived cube
        (payload in cold storage) or an expired one raises LifecycleError: restore it first.
        """
        row = self._find(cube_id, version)
        self._check_loadable(row)
        m = self._parse(row)
        return MemCube(m, self._read_payload(row, m))

    @staticmethod
    def _check_loadable(row: CubeRow) -> None:
        ref = f"{row.cube_id}@{row.version}"
        if row.cold:
            raise LifecycleError(
                f"cube {ref} is archived (its payload is in cold storage); restore it first",
                hint=f"memfed module restore {ref}",
            )
        if row.lifecycle == EXPIRED:
            raise LifecycleError(
                f"cube {ref} is expired and will be purged; restore it first to use it",
                hint=f"memfed module restore {ref}",
            )

    def get_manifest(self, cube_id: str, version: str | None = None) -> CubeManifest:
        """The stored manifest (with the current lifecycle state), without touching the payload; in
        any state, archived and expired included. ``version`` None: as in ``get``."""
        return self._parse(self._find(cube_id, version))

    def get_by_digest(self, digest: str) -> MemCube:
        """The cube whose payload has this digest. When several versions share the payload, the
        manifest is the one stored first that is loadable (not archived, not expired)."""
        try:
            check_digest_string(digest)
        except MemfedError as exc:
            raise InvalidArgumentError(exc.message, hint=exc.hint) from exc
        with self._indexed(f"looking up payload {digest}") as idx, idx.read():
            rows = idx.rows_by_digest(digest)
        if not rows:
            raise NotFoundError(f"no cube in store {self.root} has payload {digest}")
        row = next((r for r in rows if not r.cold and r.lifecycle != EXPIRED), rows[0])
        self._check_loadable(row)
        m = self._parse(row)
        return MemCube(m, self._read_payload(row, m))

    def has(self, cube_id: str, version: str | None = None) -> bool:
        """Whether the store holds ``cube_id@version`` (any version when ``version`` is None)."""
        with self._indexed(f"looking up cube {cube_id}") as idx:
            if version is None:
                return bool(idx.versions(cube_id))
            return idx.row(cube_id, version) is not None

    def current_version(self, cube_id: str) -> str | None:
        """The version in use: the newest by semver that is neither archived nor expired (nor has its
        payload in cold storage); None when every version is. NotFoundError when none is stored."""
        try:
            check_cube_id(cube_id)
        except MemfedError as exc:
            raise InvalidArgumentError(exc.message, hint=exc.hint) from exc
        with self._indexed(f"looking up cube {cube_id}") as idx:
            states = idx.version_states(cube_id)
        if not states:
            raise NotFoundError(f"no cube {cube_id!r} in store {self.root}")
        return _current(states)

    def is_cold(self, cube_id: str, version: str) -> bool:
        """Whether the payload of ``cube_id@version`` is in cold storage (archived), not objects/."""
        with self._indexed(f"looking up cube {cube_id}@{version}") as idx:
            row = idx.row(cube_id, version)
        if row is None:
            raise NotFoundError(f"no cube {cube_id}@{version} in store {self.root}")
        return bool(row.cold)

    def versions(self, cube_id: str) -> builtins.list[str]:
        """All stored versions of a cube, oldest first by semver ([] when none)."""
        with self._indexed(f"listing the versions of {cube_id}") as idx:
            found = idx.versions(cube_id)
        return sorted(found, key=_version_order)

    def list(
        self,
        cube_id_prefix: str | None = None,
        states: Iterable[str | int] | None = None,
        *,
        include_expired: bool = False,
    ) -> builtins.list[CubeManifest]:
        """Manifests of stored cubes, by cube id then semver; optionally only ids starting with
        ``cube_id_prefix`` and only the given lifecycle states.

        Expired cubes are hidden unless ``include_expired`` or ``states`` names them.
        """
        if states is not None:
            numbers: builtins.list[int] | None = [_state_number(s) for s in states]
        elif include_expired:
            numbers = None
        else:
            numbers = [n for n in LIFECYCLE_NAMES.values() if n != EXPIRED]
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
                states = idx.version_states(cube_id)
                if not states:
                    raise NotFoundError(f"no cube {cube_id!r} in store {self.root}")
                version = _current(states) or max((v for v, _, _ in states), key=_version_order)
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
        self,
        cube_id: str,
        version: str,
        state: str | int,
        reason: str = "",
        *,
        expect: str | int | None = None,
    ) -> tuple[int, int]:
        """Record a lifecycle transition; return (old, new) state numbers.

        The stored manifest's ``lifecycle`` field changes with it, in the same transaction as the event.
        Which transitions are legal is not decided here (memfed.node.lifecycle does), with one exception:
        a cube whose payload is in cold storage can only be archived or expired (``restore_payload``
        brings it back). Setting the current state again changes and records nothing. With ``expect``,
        the change is made only if the cube is still in that state (LifecycleError otherwise): a caller
        that checked a transition's legality cannot race another process's change.
        """
        new = _state_number(state)
        with self._indexed(f"setting the lifecycle of {cube_id}@{version}") as idx, idx.write():
            row = self._row_in_state(idx, cube_id, version, expect)
            old = row.lifecycle
            if old != new:
                if row.cold and new not in COLD_STATES:
                    raise LifecycleError(
                        f"cube {cube_id}@{version} is archived (its payload is in cold storage): it "
                        f"cannot become {lifecycle_name(new)} before it is restored",
                        hint=f"memfed module restore {cube_id}@{version}",
                    )
                self._record(idx, row, new, reason)
        return old, new

    def _row_in_state(self, idx: StoreIndex, cube_id: str, version: str, expect: str | int | None) -> CubeRow:
        """The row of ``cube_id@version``; NotFoundError without one, LifecycleError when ``expect`` is
        given and the cube is in another state."""
        row = idx.row(cube_id, version)
        if row is None:
            raise NotFoundError(f"no cube {cube_id}@{version} in store {self.root}")
        if expect is not None and row.lifecycle != _state_number(expect):
            raise LifecycleError(
                f"cube {cube_id}@{version} is {lifecycle_name(row.lifecycle)}, not "
                f"{lifecycle_name(_state_number(expect))}: another process changed it meanwhile; "
                "nothing was done",
                hint="check its state and retry",
            )
        return row

    def _record(self, idx: StoreIndex, row: CubeRow, new: int, reason: str) -> None:
        """Set the state of ``row`` (manifest too) and record the event; inside a write transaction."""
        m = self._parse(row)
        m.lifecycle = new
        idx.update_lifecycle(row.cube_id, row.version, new, manifest_to_bytes(m))
        idx.add_event(row.cube_id, row.version, row.lifecycle, new, reason)

    def state_entered(self, state: str | int) -> builtins.list[tuple[str, str, datetime]]:
        """(cube_id, version, when it entered the state) of every cube now in ``state``, by cube id."""
        number = _state_number(state)
        with self._indexed(f"listing {lifecycle_name(number)} cubes") as idx, idx.read():
            found = idx.entered_state(number)
        return [(c, v, datetime.fromisoformat(at)) for c, v, at in found]

    # -- cold storage --------------------------------------------------------------------------------

    def archive_payload(
        self,
        cube_id: str,
        version: str,
        state: str | int = "archived",
        reason: str = "",
        *,
        expect: str | int | None = None,
    ) -> tuple[int, int]:
        """Move the payload of ``cube_id@version`` into cold storage (gzip) and set its state (ARCHIVED
        or EXPIRED) as one recorded transition; return (old, new) state numbers.

        The hot bytes are verified against the digest while they are compressed (IntegrityError, and
        nothing changes, when they are damaged). The hot file is removed afterwards unless another
        version still uses it. Already cold: only the state changes. See the module docstring for the
        crash-safe order.
        """
        new = _state_number(state)
        if new not in COLD_STATES:
            raise InvalidArgumentError(
                f"an archived payload's state must be archived or expired, not {state}"
            )
        ref = f"{cube_id}@{version}"
        with self._indexed(f"archiving {ref}") as idx, idx.read():
            row = self._row_in_state(idx, cube_id, version, expect)
        if row.cold:
            return self.set_lifecycle(cube_id, version, new, reason, expect=row.lifecycle)
        src, dst = self.payload_path(row.digest), self.cold_path(row.digest)
        doing = f"archiving {ref} into {self.cold_dir}"
        try:
            temp = files.TempFile(self.tmp_dir)
        except OSError as exc:
            raise _describe_os_error(exc, doing) from exc
        try:
            try:
                source = open(src, "rb", buffering=0)  # noqa: SIM115 (closed below)
            except FileNotFoundError:
                self._check_unchanged(row)
                raise IntegrityError(
                    f"payload file of cube {ref} is missing: {src}; it cannot be archived",
                    hint="put this cube again from its source, then archive it",
                ) from None
            with source:
                size, sha = _compress_file(source, temp.fileno())
            temp.fsync()
            files.make_dir_durable(self.cold_dir)
            files.make_dir_durable(dst.parent)
            if size != row.size or sha.hex() != digest_hex(row.digest):
                self._check_unchanged(row)
                raise IntegrityError(
                    f"payload file of cube {ref} is damaged ({src}: {size:,} bytes hashing to "
                    f"sha256:{sha.hex()}, expected {row.size:,} bytes, {row.digest}); nothing was archived",
                    hint="put this cube again from its source (a verified copy replaces the damaged file), "
                    "then archive it",
                )
            self._switch_location(row, temp, dst, new, reason, cold=True)
        except OSError as exc:
            raise _describe_os_error(exc, doing) from exc
        finally:
            temp.discard()
        with self._indexed(f"archiving {ref}") as idx:
            self._remove_if_unreferenced(idx, row.digest, cold=False)
        return row.lifecycle, new

    def restore_payload(
        self,
        cube_id: str,
        version: str,
        state: str | int = "activated",
        reason: str = "",
        *,
        expect: str | int | None = None,
    ) -> tuple[int, int]:
        """Bring the payload of ``cube_id@version`` back from cold storage into objects/ and set its
        state, as one recorded transition; return (old, new) state numbers.

        The decompressed bytes are verified against the manifest's digest (and the local check that
        ``get`` verifies) before anything changes; IntegrityError when the cold copy is damaged or
        missing. Not cold: only the state changes.
        """
        new = _state_number(state)
        ref = f"{cube_id}@{version}"
        with self._indexed(f"restoring {ref}") as idx, idx.read():
            row = self._row_in_state(idx, cube_id, version, expect)
        if not row.cold:
            return self.set_lifecycle(cube_id, version, new, reason, expect=row.lifecycle)
        src, dst = self.cold_path(row.digest), self.payload_path(row.digest)
        doing = f"restoring {ref} into {self.objects_dir}"
        what_to_do = "put this cube again from its source, or restore the file from a backup"
        try:
            temp = files.TempFile(self.tmp_dir)
        except OSError as exc:
            raise _describe_os_error(exc, doing) from exc
        try:
            try:
                source = open(src, "rb", buffering=0)  # noqa: SIM115 (closed below)
            except FileNotFoundError:
                self._check_unchanged(row)
                raise IntegrityError(f"cold copy of cube {ref} is missing: {src}", hint=what_to_do) from None
            try:
                with source:
                    size, sha, check = _decompress_file(source, row.size, temp.fileno())
                temp.fsync()
            except _ColdDamage as exc:
                self._check_unchanged(row)
                raise IntegrityError(
                    f"cold copy of cube {ref} is damaged: {src}: {exc}", hint=what_to_do
                ) from None
            if size != row.size or sha.hex() != digest_hex(row.digest) or check != row.local_check:
                self._check_unchanged(row)
                raise IntegrityError(
                    f"cold copy of cube {ref} is damaged: {src} decompresses to {size:,} bytes hashing to "
                    f"sha256:{sha.hex()}, expected {row.size:,} bytes, {row.digest}; nothing was restored",
                    hint=what_to_do,
                )
            self._switch_location(row, temp, dst, new, reason, cold=False)
        except OSError as exc:
            raise _describe_os_error(exc, doing) from exc
        finally:
            temp.discard()
        with self._indexed(f"restoring {ref}") as idx:
            self._remove_if_unreferenced(idx, row.digest, cold=True)
        return row.lifecycle, new

    def _check_unchanged(self, seen: CubeRow) -> None:
        """Raise if the row changed since ``seen`` was read (so an error is blamed on the right thing)."""
        ref = f"{seen.cube_id}@{seen.version}"
        with self._indexed(f"looking up cube {ref}") as idx, idx.read():
            row = idx.row(seen.cube_id, seen.version)
        if row is None:
            raise NotFoundError(f"cube {ref} was deleted meanwhile; nothing was done")
        if (row.lifecycle, row.cold, row.digest) != (seen.lifecycle, seen.cold, seen.digest):
            raise LifecycleError(
                f"cube {ref} changed meanwhile (now {lifecycle_name(row.lifecycle)}"
                f"{', archived' if row.cold else ''}); nothing was done",
                hint="check its state and retry",
            )

    def _switch_location(
        self, seen: CubeRow, temp: files.TempFile, dst: Path, new: int, reason: str, *, cold: bool
    ) -> None:
        """Under the write lock: move the verified, synced ``temp`` to ``dst`` and commit the row's new
        location and state, if the row is still as ``seen``. A failed commit takes a file that no row
        used out again before the lock is released."""
        with self._indexed(f"moving the payload of {seen.cube_id}@{seen.version}") as idx:
            installed_new = False
            try:
                idx.begin_write()
                row = idx.row(seen.cube_id, seen.version)
                if row != seen:
                    idx.rollback()
                    self._check_unchanged(seen)
                    raise LifecycleError(f"cube {seen.cube_id}@{seen.version} changed meanwhile; retry")
                shared = idx.digest_referenced_at(row.digest, cold=cold)
                os.rename(temp.path, dst)
                installed_new = not shared
                files.fsync_dir(dst.parent)
                idx.set_location(row.cube_id, row.version, cold=cold)
                self._record(idx, row, new, reason)
                idx.commit()
            except BaseException:
                if installed_new:
                    with contextlib.suppress(OSError):
                        os.unlink(dst)  # if this fails too: an orphan, which gc() removes
                idx.rollback()
                raise

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

    def delete(self, cube_id: str, version: str, *, expect: str | int | None = None) -> bool:
        """Remove ``cube_id@version`` and its history. Its payload file (hot or cold) is removed too
        unless another version shares it; return whether it was. With ``expect``, only if the cube is
        in that state (LifecycleError otherwise).

        The row goes first (committed), the file after, under a second write lock: killed in between,
        the file is an orphan for ``gc()``; never is a row left pointing at a removed file.
        """
        with self._indexed(f"deleting {cube_id}@{version}") as idx:
            with idx.write():
                row = self._row_in_state(idx, cube_id, version, expect)
                idx.delete(cube_id, version)
            return self._remove_if_unreferenced(idx, row.digest, cold=bool(row.cold))

    def _remove_if_unreferenced(self, idx: StoreIndex, digest: str, *, cold: bool = False) -> bool:
        """Unlink a payload file (in cold/ when ``cold``, else objects/) that no row expects there, under
        the write lock; return whether it was."""
        path = self.cold_path(digest) if cold else self.payload_path(digest)
        try:
            with idx.write():
                if idx.digest_referenced_at(digest, cold=cold):
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
        """Remove temp files of dead writers and payload files that no index row references: files in
        objects/ that no row expects there (hot), and files in cold/ that no archived row expects there.

        Runs under the index write lock, so no put can be between its rename and its commit meanwhile.
        """
        try:
            report = GcReport(removed_temp=files.sweep_temp(self.tmp_dir))
            with self._indexed("collecting garbage") as idx, idx.write():
                hot, cold = idx.digests_at(cold=False), idx.digests_at(cold=True)
                found = [(p, d, hot) for p, d in self._object_files(report.foreign)]
                found += [(p, d, cold) for p, d in self._cold_files(report.foreign)]
                for path, digest, referenced in found:
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

    def _cold_files(self, foreign: builtins.list[Path]) -> Iterable[tuple[Path, str]]:
        """(path, digest) of every cold copy in cold/ (none before the first archive); others to
        ``foreign``."""
        if not self.cold_dir.is_dir():
            return
        hexdigits = set("0123456789abcdef")
        n = len(COLD_SUFFIX)
        for prefix in sorted(os.listdir(self.cold_dir)):
            pdir = self.cold_dir / prefix
            if not (len(prefix) == 2 and set(prefix) <= hexdigits and pdir.is_dir()):
                foreign.append(pdir)
                continue
            for name in sorted(os.listdir(pdir)):
                stem = name[:-n]
                if name.endswith(COLD_SUFFIX) and len(stem) == 62 and set(stem) <= hexdigits:
                    yield pdir / name, f"sha256:{prefix}{stem}"
                else:
                    foreign.append(pdir / name)

    # -- checking ------------------------------------------------------------------------------------

    def verify_all(self) -> VerifyReport:
        """Check the whole store (fsck): the index file's own consistency, every manifest, and that every
        referenced payload exists where its row says (objects/, or cold/ for an archived one, which is
        decompressed) and hashes to its digest. Changes nothing."""
        report = VerifyReport()
        with self._indexed("verifying the store") as idx, idx.read():
            for line in idx.quick_check():
                report.problems.append(StoreProblem("index", line, self.index_path))
            rows = idx.rows(None, None)
        by_digest: dict[tuple[str, int], builtins.list[CubeRow]] = {}
        for row in rows:
            try:
                self._parse(row)
            except IntegrityError as exc:
                report.problems.append(
                    StoreProblem(
                        "bad_manifest", exc.message, self.index_path, (f"{row.cube_id}@{row.version}",)
                    )
                )
            by_digest.setdefault((row.digest, int(bool(row.cold))), []).append(row)
        for (digest, cold), users in sorted(by_digest.items()):
            refs = tuple(f"{r.cube_id}@{r.version}" for r in users)
            path = self.cold_path(digest) if cold else self.payload_path(digest)
            expected_size = users[0].size
            try:
                if cold:
                    with open(path, "rb", buffering=0) as f:
                        size, raw, _ = _decompress_file(f, expected_size, None)
                else:
                    size, raw = files.hash_file(path)
            except _ColdDamage as exc:
                report.problems.append(StoreProblem("corrupt", f"cold copy: {exc}", path, refs))
                continue
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
        report.orphans = [p for p, d in self._object_files([]) if (d, 0) not in by_digest]
        report.orphans += [p for p, d in self._cold_files([]) if (d, 1) not in by_digest]
        return report


class _ColdDamage(Exception):
    """A cold copy that does not decompress (bad gzip data, CRC, truncated, trailing or excess bytes)."""


def _compress_file(source: BinaryIO, fd: int) -> tuple[int, bytes]:
    """Gzip ``source`` into ``fd``; return (size, raw SHA-256) of the uncompressed bytes read."""
    sha = hashlib.sha256()
    comp = zlib.compressobj(COLD_LEVEL, zlib.DEFLATED, 31)  # wbits 31: gzip format, zcat reads it
    size = 0
    buf = bytearray(files.CHUNK)
    while n := source.readinto(buf):
        chunk = memoryview(buf)[:n]
        sha.update(chunk)
        size += n
        files.write_all(fd, memoryview(comp.compress(chunk)))
    files.write_all(fd, memoryview(comp.flush()))
    return size, sha.digest()


def _decompress_file(source: BinaryIO, expected_size: int, fd: int | None) -> tuple[int, bytes, bytes]:
    """Gunzip ``source`` (into ``fd`` unless None) while hashing what comes out; return (size, raw
    SHA-256, raw XXH3-128). Never produces more than ``expected_size`` + one chunk: a damaged or
    hostile file cannot fill the disk. Raises _ColdDamage when the data is not one whole gzip stream."""
    sha, check = hashlib.sha256(), xxhash.xxh3_128()
    d = zlib.decompressobj(31)
    size = 0

    def take(out: bytes) -> None:
        nonlocal size
        size += len(out)
        if size > expected_size:
            raise _ColdDamage(f"decompresses to more than the {expected_size:,} bytes expected")
        sha.update(out)
        check.update(out)
        if fd is not None:
            files.write_all(fd, memoryview(out))

    try:
        while not d.eof:
            data = d.unconsumed_tail or source.read(files.CHUNK)
            out = d.decompress(data, files.CHUNK)  # b"" input still drains output zlib holds back
            take(out)
            if not data and not out:
                raise _ColdDamage("the compressed stream is truncated")
        if d.unused_data or source.read(1):
            raise _ColdDamage("trailing bytes after the compressed stream")
    except zlib.error as exc:
        raise _ColdDamage(str(exc)) from None
    return size, sha.digest(), check.digest()


def _current(states: Iterable[tuple[str, int, int]]) -> str | None:
    """The newest version of (version, lifecycle, cold) rows that is not archived, expired or cold."""
    live = [v for v, state, cold in states if not cold and state not in COLD_STATES]
    return max(live, key=_version_order) if live else None


def _version_order(version: str) -> tuple[tuple[int, int, int, int, str], str]:
    """semver order; the raw string breaks ties between versions that differ only in build metadata."""
    try:
        return semver_key(version), version
    except MemfedError:  # a hand-edited index; sort it first rather than fail every lookup
        return (-1, -1, -1, -1, ""), version
