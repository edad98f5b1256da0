"""Payload files of the cube store: verified, overlapped, crash-safe file I/O.

Nothing here knows about manifests or the index; it moves bytes between memory and files and proves
they hash to what was expected. Three facts of this machine kind shape it (see FIELD-NOTES.md):

* SHA-256 runs at about the speed of a page-cache read (≈2 GB/s each), so "read, then hash" costs twice
  a raw read. Every verified transfer here overlaps the two: one thread moves bytes, a worker hashes the
  chunk moved just before (``hashlib`` releases the GIL on buffers of 2 KiB or more).
* A fresh 64 MB allocation costs as much as the copy into it (page faults), so reads go straight into
  the ``bytes`` object that is returned, never through a second buffer (see :func:`new_bytes`).
* ``fsync`` is the dominant cost of a small durable write, so a put fsyncs its file once and its
  directory once (the store adds one WAL fsync at commit), and directories are created up front.

Two hashes. The manifest's digest is SHA-256: what producers sign and peers compare, checked on every
put (and by ``verify_all``). Re-hashing every read with it would cost 4x the read itself here (SHA-256
≈1.6 GB/s against a page-cache read of ≈6 GB/s into huge pages; BLAKE3 measured 3.4 GB/s on this AVX2
CPU, still 1.8x). So a put also records a local check of the same bytes, XXH3-128 (≈15 GB/s), and a get
verifies that. What the local check guards against is accidental damage (bit rot, truncation, a
partial copy): an attacker able to rewrite payload files can rewrite the index next to them too, so a
cryptographic local check would buy nothing there; authenticity is established where bytes cross a
trust boundary (put, sealed import), by SHA-256 and the producer's signature.

Errors are left as ``OSError``; the store turns them into ``StorageError`` with the cube's name in it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import mmap
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from memfed.fsio import fsync_dir

# Chunk of a pipelined read: small enough that the chunk just read is still in the CPU cache when the
# hash worker reads it, big enough that the per-chunk hand-off (≈20 µs) is noise. 1-4 MiB measured
# equal here; 16 MiB was 10% slower (the tail chunk is hashed alone).
CHUNK = 2 * 1024 * 1024
# Below this size a worker hand-off costs more than the overlap wins; hash inline.
INLINE_LIMIT = 512 * 1024
# Reads hash with XXH3 (≈15 GB/s): below this size hashing after the read costs less than waking a
# worker to overlap it (measured for 2.4 MB: 0.16 ms of hashing against ≈0.2 ms of hand-off).
READ_INLINE_LIMIT = 8 * 1024 * 1024
TEMP_SUFFIX = ".part"
# A temp file whose writer holds no lock is left alone this long after its last change, in case its
# writer is between creating it and locking it (microseconds) or lives in another PID namespace.
TEMP_GRACE_SECONDS = 600.0


# --------------------------------------------------------------------------------------------------
# The hash worker pool

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _hash_pool() -> ThreadPoolExecutor:
    """A process-wide pool for hash work. Each transfer uses one worker at a time (its chunks are
    hashed strictly in order); several workers let concurrent transfers in different threads overlap."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(
                max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="memfed-hash"
            )
        return _pool


def _forget_pool_after_fork() -> None:
    # A forked child inherits the pool object but not its threads: submitting to it would hang.
    global _pool, _pool_lock
    _pool = None
    _pool_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_pool_after_fork)


HashFactory = Callable[[], Any]  # hashlib.sha256 or xxhash.xxh3_128: objects with update() and digest()


class _Hashes:
    """Several hashes of one byte stream, updated together (one GIL-free call each)."""

    def __init__(self, factories: tuple[HashFactory, ...]) -> None:
        self._hs = [f() for f in factories]

    def update(self, data: memoryview) -> None:
        for h in self._hs:
            h.update(data)

    def digests(self) -> tuple[bytes, ...]:
        return tuple(h.digest() for h in self._hs)


class _PipelinedHash:
    """Hashes fed chunk by chunk on a worker thread, one chunk in flight at most.

    ``feed`` waits for the previous chunk before handing over the next one, so the hash sees chunks in
    order and a caller may reuse a buffer two chunks later (double buffering).
    """

    def __init__(self, *factories: HashFactory) -> None:
        self._h = _Hashes(factories)
        self._pending: Future[None] | None = None

    def feed(self, chunk: memoryview) -> None:
        self.wait()
        if len(chunk) < INLINE_LIMIT:
            self._h.update(chunk)
        else:
            self._pending = _hash_pool().submit(self._h.update, chunk)

    def wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def digests(self) -> tuple[bytes, ...]:
        self.wait()
        return self._h.digests()


class _TrailingHash:
    """The hash of a buffer that is being filled front to back, computed by a worker that trails the
    filler.

    The filler calls ``advance(n)`` when the first ``n`` bytes are final; the worker hashes whatever
    is ready in one call per wake-up. When filling is faster than hashing (page-cache reads are), the
    worker never waits after the first chunk: there is no per-chunk hand-off for a busy scheduler to
    delay. (A hand-off per chunk measured 80 ms for 64 MiB with the CPU shared, against 55 ms.)
    """

    def __init__(self, view: memoryview, factory: HashFactory) -> None:
        self._view = view
        self._h = factory()
        self._ready = 0
        self._closed = False
        self._cond = threading.Condition()
        self._done = _hash_pool().submit(self._run)

    def _run(self) -> None:
        hashed = 0
        while True:
            with self._cond:
                while self._ready == hashed and not self._closed:
                    self._cond.wait()
                ready = self._ready
            if ready > hashed:
                self._h.update(self._view[hashed:ready])
                hashed = ready
            else:
                return  # closed, and everything ready is hashed

    def advance(self, ready: int) -> None:
        with self._cond:
            self._ready = ready
            self._cond.notify()

    def finish(self) -> bytes:
        """Wait until everything advanced over is hashed; return the digest."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._done.result()
        return self._h.digest()


# --------------------------------------------------------------------------------------------------
# bytes filled in place


def _bytes_filler():  # type: ignore[no-untyped-def]
    """Return CPython's documented way to build a ``bytes`` in place, or None where it is missing.

    ``PyBytes_FromStringAndSize(NULL, n)`` returns a new, uninitialised bytes object that its creator
    may fill before anyone else sees it — exactly what ``FileIO.read`` does inside. Reading into it
    lets a verified read hand out ``bytes`` (immutable, what ``MemCube.payload`` promises) without a
    64 MB copy out of a scratch buffer, which would cost as much as the read itself.
    """
    try:
        api = ctypes.pythonapi
        from_size = api.PyBytes_FromStringAndSize
        as_string = api.PyBytes_AsString
    except (AttributeError, OSError):  # not CPython
        return None
    from_size.restype = ctypes.py_object
    from_size.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
    as_string.restype = ctypes.c_void_p
    as_string.argtypes = (ctypes.py_object,)
    return from_size, as_string


_FILLER = _bytes_filler()


def _madvise_fn():  # type: ignore[no-untyped-def]
    """libc ``madvise`` and MADV_HUGEPAGE where both exist (Linux), else None."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None:
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return lambda addr, length: fn(addr, length, advice)


_HUGEPAGE_ADVISE = _madvise_fn()
# Only buffers this big get the advice: they are their own mmap'd chunk in glibc's malloc, so the
# advice changes no memory but ours, and there are whole 2 MiB pages inside to gain.
HUGEPAGE_MIN = 8 * 1024 * 1024
_PAGE = mmap.PAGESIZE


def _advise_hugepages(addr: int, size: int) -> None:
    """Ask for transparent huge pages on a fresh buffer before it is first touched.

    Measured here: reading 64 MiB from the page cache into fresh 4 KiB pages costs 36-40 ms, most of
    it page faults (a VM makes each fault dear); into 2 MiB pages it costs 11 ms. (This VM sometimes
    has to back fresh 2 MiB pages on the host first; then it is no faster than 4 KiB pages.)
    Advisory: where THP is off, or the call fails, nothing changes but the speed.
    """
    if _HUGEPAGE_ADVISE is None or size < HUGEPAGE_MIN:
        return
    start = (addr + _PAGE - 1) & ~(_PAGE - 1)
    end = (addr + size) & ~(_PAGE - 1)
    if end > start:
        _HUGEPAGE_ADVISE(start, end - start)


def new_bytes(size: int) -> tuple[bytes, memoryview]:
    """A new ``bytes`` of ``size`` bytes and a writable view of its storage.

    The caller must fill the whole view, then release it, before the ``bytes`` is used or shared.
    Where the in-place route is unavailable (not CPython), the view is a scratch ``bytearray`` and the
    caller must call :func:`finish_bytes` to get the bytes (one copy).
    """
    if _FILLER is not None and size > 1:  # 0 and 1-byte objects may be shared singletons: never write
        from_size, as_string = _FILLER
        obj = from_size(None, size)
        addr = as_string(obj)
        _advise_hugepages(addr, size)
        view = memoryview((ctypes.c_ubyte * size).from_address(addr)).cast("B")
        return obj, view
    scratch = bytearray(size)
    return b"", memoryview(scratch)


def finish_bytes(obj: bytes, view: memoryview) -> bytes:
    """The filled bytes from :func:`new_bytes` (copies only on the fallback route); releases ``view``."""
    if len(obj) == len(view) and len(obj) > 1:
        view.release()
        return obj
    data = bytes(view)
    view.release()
    return data


# --------------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class ReadResult:
    """What a verified read found. ``digest`` is the raw XXH3-128 (the store's local check) of ``data``."""

    data: bytes
    digest: bytes


class ShortFileError(Exception):
    """The file ended before the expected size, or is longer than it (truncated or extended)."""

    def __init__(self, actual: int, expected: int) -> None:
        super().__init__(f"file is {actual} bytes, expected {expected}")
        self.actual = actual
        self.expected = expected


def read_hashed(path: Path, expected_size: int) -> ReadResult:
    """Read a whole file into a new ``bytes`` while computing its local check (XXH3-128), overlapped.

    Raises ShortFileError when the file's size is not ``expected_size`` (checked before reading, and
    again at EOF in case it changed underneath), OSError for I/O errors (FileNotFoundError included).
    """
    with open(path, "rb", buffering=0) as f:
        actual = os.fstat(f.fileno()).st_size
        if actual != expected_size:
            raise ShortFileError(actual, expected_size)
        if expected_size < READ_INLINE_LIMIT:
            data = f.read(expected_size + 1)
            if len(data) != expected_size:
                raise ShortFileError(len(data), expected_size)
            return ReadResult(data, xxhash.xxh3_128(data).digest())
        # ``obj`` owns the memory ``view`` points into: it must outlive every use of the view,
        # including a hash still running on the worker when an error unwinds this frame.
        obj, view = new_bytes(expected_size)
        h = _TrailingHash(view, xxhash.xxh3_128)
        try:
            off = 0
            while off < expected_size:
                n = f.readinto(view[off : off + CHUNK])
                if not n:
                    raise ShortFileError(off, expected_size)
                off += n
                h.advance(off)
            if f.read(1):  # grew while we read
                raise ShortFileError(expected_size + 1, expected_size)
        finally:
            digest = h.finish()
        return ReadResult(finish_bytes(obj, view), digest)


def hash_file(path: Path) -> tuple[int, bytes]:
    """(size, raw SHA-256) of a file, read through two reused buffers (for fsck: nothing is kept)."""
    h = _PipelinedHash(hashlib.sha256)
    buffers = (memoryview(bytearray(CHUNK)), memoryview(bytearray(CHUNK)))
    size = 0
    with open(path, "rb", buffering=0) as f:
        i = 0
        while True:
            buf = buffers[i & 1]  # hashed two feeds ago at the latest; feed() waited for that one
            n = f.readinto(buf)
            if not n:
                break
            h.feed(buf[:n])
            size += n
            i += 1
    return size, h.digests()[0]


# --------------------------------------------------------------------------------------------------
# Writing


def write_all(fd: int, data: memoryview) -> None:
    """``os.write`` until every byte is written (a regular-file write may return short)."""
    off = 0
    total = len(data)
    while off < total:
        off += os.write(fd, data[off:])


def write_hashed_synced(fd: int, data: memoryview) -> tuple[bytes, bytes]:
    """Write ``data`` to ``fd`` and fsync it while a worker hashes the same memory; return the raw
    (SHA-256, XXH3-128 local check) (the caller compares the first and discards the file on a mismatch).

    The payload is already in memory, so the hash needs no pipelining: the worker hashes the whole
    buffer in one GIL-free call while this thread writes it and then waits in fsync. The fsync does not
    wait for the hash: on a busy machine the hash then runs on the CPU the fsync leaves idle, and a
    mismatch (rare, an error) only wastes one fsync.
    """
    h = _Hashes((hashlib.sha256, xxhash.xxh3_128))
    if len(data) < INLINE_LIMIT:
        write_all(fd, data)
        os.fsync(fd)
        h.update(data)
        return h.digests()  # type: ignore[return-value]
    fut = _hash_pool().submit(h.update, data)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        fut.result()  # never leave the worker reading a buffer the caller may free
    return h.digests()  # type: ignore[return-value]


def write_hashed_chunks_synced(
    fd: int, chunks: Iterable[bytes | bytearray | memoryview]
) -> tuple[int, tuple[bytes, bytes]]:
    """Write a stream of chunks while hashing each on a worker, then fsync; return
    (size, (SHA-256, XXH3-128 local check)).

    Chunks are hashed in order, one in flight at most. Callers must not reuse a chunk's buffer for the
    chunk after next (the one after it may still be hashing).
    """
    h = _PipelinedHash(hashlib.sha256, xxhash.xxh3_128)
    size = 0
    try:
        for chunk in chunks:
            view = memoryview(chunk).cast("B")
            write_all(fd, view)
            h.feed(view)
            size += len(view)
        os.fsync(fd)
    finally:
        h.wait()
    sha, b3 = h.digests()
    return size, (sha, b3)


def make_dir_durable(path: Path) -> None:
    """Create ``path`` (one level) if missing and make its entry durable in its parent."""
    try:
        os.mkdir(path)
    except FileExistsError:
        return
    fsync_dir(path.parent)


class TempFile:
    """A uniquely named, exclusively locked file in the store's ``tmp/`` directory.

    The name carries the writer's pid (for humans, and for a fast "writer is dead" check), and the
    writer holds an ``flock`` on it until it is renamed or removed: a killed process drops the lock, so
    :func:`sweep_temp` can tell an abandoned temp file from one in progress without trusting pids
    (which are reused, and differ between PID namespaces sharing a volume).
    """

    def __init__(self, tmp_dir: Path) -> None:
        name = f"{os.getpid()}-{secrets.token_hex(8)}{TEMP_SUFFIX}"
        self.path = tmp_dir / name
        # 0444: a payload is immutable once written; the mode only applies to later opens.
        self.fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except BaseException:
            self.discard()
            raise

    def fileno(self) -> int:
        if self.fd is None:
            raise ValueError("temp file is closed")
        return self.fd

    def fsync(self) -> None:
        os.fsync(self.fileno())

    def close(self) -> None:
        """Close the descriptor (drops the lock). Call after the file has been renamed away."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    def discard(self) -> None:
        """Remove the file (if still there) and close it; never raises."""
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            self.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def sweep_temp(tmp_dir: Path, *, grace_seconds: float = TEMP_GRACE_SECONDS) -> list[Path]:
    """Remove temp files left by dead writers; return what was removed.

    A file is removed only when nobody holds its lock AND (its writer pid is gone, or it has not changed
    for ``grace_seconds``). Files that do not look like ours are left alone.
    """
    removed: list[Path] = []
    try:
        names = os.listdir(tmp_dir)
    except FileNotFoundError:
        return removed
    now = time.time()
    for name in names:
        if not name.endswith(TEMP_SUFFIX):
            continue
        pid_text = name.split("-", 1)[0]
        path = tmp_dir / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue  # already gone, or not ours to read
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    continue  # a live writer holds it
                raise
            dead = pid_text.isdigit() and not _pid_alive(int(pid_text))
            stale = now - os.fstat(fd).st_mtime > grace_seconds
            if dead or stale:
                try:
                    os.unlink(path)
                    removed.append(path)
                except FileNotFoundError:
                    pass
        finally:
            os.close(fd)
    return removed
