"""Sync: pull the newest version of a subscribed cube from a node that holds it, sealed and resumable.

    syncer = Syncer(store=store, identity=ident, registry=reg_client, tls=TlsFiles.from_dir(...),
                    node_id="node-b", host_fingerprint=lambda: node.fingerprint, partial_dir=...)
    result = syncer.sync("legal_expert")

Steps: a signed catalog answer from the registry (verified: signature, expiry, sequence) names the
newest version and its holders; the registry issues a capability token for ``export`` (or refuses, and
audits it); the holder streams the cube sealed for this node over mutual TLS (the holder's certificate
must carry the holder's node id).

Receiving writes the payload once. The sealed header is checked (envelope, signature, content key,
catalog) before any chunk is kept, and saved as ``<cube>@<version>.header`` in ``partial_dir``; each
chunk is authenticated (AES-GCM) and its *plaintext* appended to ``<cube>@<version>.payload.part``,
hashed on the way (SHA-256 for the manifest's digest, XXH3-128 for the store's local check, as a put
does). When the stream has ended and every check has passed — digest, then base model and watermark
(the order and code of ``open_into_store``), then the safetensors check for weights — the store
*adopts* that file (``CubeStore.adopt_file``: fsync, rename into its objects, commit the index row), so
the bytes are never copied a second time. Writing them twice (a resumable partial file and the store's
own temp file) was what bounded the transfer: each write to fresh pages costs as much as the network.

A transfer cut anywhere — the process killed, the link dropped — resumes from the last whole chunk:
the holder re-sends the same sealed stream (same header, same key), the saved header must equal the new
one byte for byte, and the kept prefix is re-hashed from the file (a hash state cannot be saved) before
the new chunks are appended. The kept plaintext is not authenticated again, but the digest over the
whole payload is checked before adoption, so a damaged partial file (e.g. after a power loss: it is
not fsynced) fails that check and the transfer starts over. The store never holds a partial cube: until
adoption the payload lives only in ``partial_dir``; the partial files are gone once the cube is in.

The received manifest must be the catalog's version: same cube, version and version chain
(mix-and-match), and the same digest unless the holder watermarked it for us (then the manifest says so
in its signed annotations).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import logging
import mmap
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import xxhash

from memfed.client import CHANNEL_OPTIONS, error_from_rpc
from memfed.crypto.envelope import PREFIX_BYTES, encode_header, header_hash, read_header
from memfed.crypto.identity import Identity
from memfed.crypto.seal import (
    WM_SCHEME,
    PayloadFormatCheck,
    _base_model_problem,
    _watermark_problem,
    open_header,
)
from memfed.crypto.signing import TrustedKeys
from memfed.crypto.stream import TAG_BYTES, StreamDecryptor, chunk_plain_len
from memfed.cube.digest import format_digest
from memfed.cube.manifest import PARAMETRIC_KINDS, CubeManifest, manifest_from_bytes, ref_string
from memfed.errors import (
    IncompatibleModelError,
    IntegrityError,
    InvalidArgumentError,
    MemfedError,
    NotFoundError,
    StorageError,
    UnavailableError,
    UnsupportedError,
)
from memfed.mip.v1 import node_service_pb2
from memfed.node.service.sealed import public_identity_of
from memfed.node.service.serde import ChunkView, decode_stream_message
from memfed.registry.tls import TlsFiles
from memfed.registry_client import RegistryClient

pb = node_service_pb2
log = logging.getLogger("memfed.node.sync")
FETCH_CUBE = "/memfed.mip.v1.NodeService/FetchCube"
HEADER_SUFFIX = ".header"
PAYLOAD_SUFFIX = ".payload.part"
# A transfer refused for its content (not cut): its partial files are useless, the next try starts over.
# Plaintext buffers of a transfer: chunks being written or hashed, plus the one being handed over.
_BUFFERS = 4
_REFUSALS = (IntegrityError, IncompatibleModelError, UnsupportedError, InvalidArgumentError)


@dataclass(frozen=True)
class SyncResult:
    cube_id: str
    version: str
    status: str  # "synced" | "up-to-date"
    holder: str = ""
    resumed_from_chunk: int = 0
    chunks: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Syncer:
    """Pulls cubes into ``store`` for this node (see the module docstring)."""

    def __init__(
        self,
        *,
        store: Any,
        identity: Identity,
        registry: RegistryClient,
        tls: TlsFiles,
        node_id: str,
        host_fingerprint: Callable[[], Any] | Any,
        partial_dir: Path,
        chunk_delay_s: float = 0.0,
        timeout_s: float = 600.0,
        chunk_size: int = 0,
    ) -> None:
        self.chunk_size = chunk_size
        self.store = store
        self.identity = identity
        self.registry = registry
        self.tls = tls
        self.node_id = node_id
        self.host_fingerprint = host_fingerprint
        self.partial_dir = Path(partial_dir)
        self.chunk_delay_s = chunk_delay_s
        self.timeout_s = timeout_s

    # -- the catalog --------------------------------------------------------------------------------------

    def newest(self, cube_id: str) -> tuple[CubeManifest, list[str]]:
        answer = self.registry.lookup(cube_id)
        if not answer.versions:
            raise NotFoundError(f"the catalog lists no versions of {cube_id!r}")
        entry = answer.versions[-1]
        return manifest_from_bytes(entry.manifest.manifest), list(entry.holders)

    def sync(self, cube_id: str) -> SyncResult:
        """Bring ``cube_id`` up to its newest catalog version (no-op when the store has it)."""
        m, holders = self.newest(cube_id)
        if self.store.has(m.cube_id, m.version):
            return SyncResult(m.cube_id, m.version, "up-to-date")
        holders = [h for h in holders if h != self.node_id]
        if not holders:
            raise UnavailableError(f"no other node holds {ref_string(m)}", hint="try again when one does")
        token = self.registry.issue_token(cube_id, "export")  # refused (and audited) without a grant
        last: MemfedError | None = None
        for holder in holders:
            try:
                return self._pull(m, holder, token)
            except UnavailableError as exc:  # that holder is down: try the next
                last = exc
                log.warning("sync of %s from %s failed: %s", ref_string(m), holder, exc)
        assert last is not None
        raise last

    # -- one transfer -------------------------------------------------------------------------------------

    def _partial_paths(self, m: CubeManifest) -> _Partial:
        base = f"{m.cube_id}@{m.version}"
        return _Partial(
            self.partial_dir / f"{base}{HEADER_SUFFIX}", self.partial_dir / f"{base}{PAYLOAD_SUFFIX}"
        )

    def _pull(self, m: CubeManifest, holder: str, token: pb.CapabilityToken) -> SyncResult:
        ident = self.registry.get_node(holder)
        if not ident.address:
            raise UnavailableError(f"holder {holder!r} registered no address")
        trusted = TrustedKeys([public_identity_of(ident)])
        self.partial_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        part = self._partial_paths(m)
        t0 = time.perf_counter()
        fd = _open_locked(part.payload)  # one receiver per partial file, held until the cube is in
        try:
            for attempt in range(2):
                saved, start = _resume_point(part, fd)
                try:
                    got, stored = self._stream(m, ident, token, trusted, part, fd, saved, start)
                except _RestartNeeded:
                    part.clear(fd)
                    if attempt:
                        raise UnavailableError(
                            "the holder changed its sealed stream twice; try again"
                        ) from None
                    continue
                except _REFUSALS:
                    part.remove()  # refused for its content: start over next time
                    raise
                break
            # The payload file is the store's now (adopted); the header goes while we hold the lock, so
            # a receiver that starts next never loses its own files to us.
            part.header.unlink(missing_ok=True)
        finally:
            os.close(fd)
        log.info("synced %s from %s (%s bytes)", ref_string(stored), holder, stored.payload.size_bytes)
        return SyncResult(
            stored.cube_id, stored.version, "synced", holder, start, got, stored.payload.size_bytes,
            time.perf_counter() - t0,
        )  # fmt: skip

    def _channel(self, ident: Any) -> grpc.Channel:
        # The holder's certificate must name the holder: TLS checks the node id as the server name.
        opts = (*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", ident.node_id))
        return grpc.secure_channel(ident.address, self.tls.channel_credentials(), options=opts)

    def _stream(
        self, m: CubeManifest, ident: Any, token: pb.CapabilityToken, trusted: TrustedKeys, part: _Partial,
        fd: int, saved: bytes | None, start: int,
    ) -> tuple[int, CubeManifest]:  # fmt: skip
        req = pb.FetchCubeRequest(
            ref=pb.CubeRef(cube_id=m.cube_id, version=m.version, digest=m.digest),
            capability=token,
            recipient_id=self.identity.recipient_id,
            resume_from_chunk=start,
            chunk_size=self.chunk_size,
        )
        with self._channel(ident) as ch:
            # Chunks are read as views into the received messages (serde.decode_stream_message).
            fetch = ch.unary_stream(
                FETCH_CUBE,
                request_serializer=pb.FetchCubeRequest.SerializeToString,
                response_deserializer=decode_stream_message,
            )
            try:
                stream = fetch(req, timeout=self.timeout_s)
                first = next(stream, None)
                if first is None:
                    raise UnavailableError(f"holder {ident.node_id!r} ended the stream before its header")
                if isinstance(first, ChunkView) or first.WhichOneof("body") != "sealed_header":
                    raise IntegrityError(
                        f"the holder started its stream with {_body(first)}, not a sealed header"
                    )
                prefix = encode_header(first.sealed_header)
                if saved is not None and prefix != saved:
                    raise _RestartNeeded
                # Steps 1-2 of open_into_store (envelope, signature, content key), then the catalog;
                # steps 4-5 (base model, watermark) are computed now and raised after the digest check,
                # in open_into_store's order and with its code.
                opened = open_header(io.BytesIO(prefix), self.identity, trusted)
                got_m = opened.manifest
                _check_against_catalog(got_m, m)
                later = _base_model_problem(got_m, self.host_fingerprint) or _watermark_problem(
                    opened, self.identity
                )
                if saved is None:
                    part.header.write_bytes(prefix)  # before any chunk: a resume needs it
                received, sha, check = self._receive(stream, opened, fd, start, later, m)
            except grpc.RpcError as exc:
                raise error_from_rpc(exc, address=ident.address) from None
        # Every check has passed: the store takes the file as it is (fsync, rename, index row).
        return received, self.store.adopt_file(got_m, part.payload, sha, check)

    def _receive(
        self, stream: Any, opened: Any, fd: int, start: int, later: MemfedError | None, m: CubeManifest
    ) -> tuple[int, bytes, bytes]:
        """Authenticate, append and hash the chunks from ``start`` on (after re-hashing the kept ones);
        return (chunks received, raw SHA-256, raw XXH3-128) once the whole payload passed its checks."""
        got_m = opened.manifest
        e = opened.header.encryption
        cs = e.chunk_size
        sha, xxh = hashlib.sha256(), xxhash.xxh3_128()
        fmt = PayloadFormatCheck(got_m.payload.size_bytes) if got_m.kind in PARAMETRIC_KINDS else None
        if start:
            _rehash_kept(fd, start * cs, cs, (sha, xxh), fmt)
        dec = StreamDecryptor(opened.content_key, e.stream_id, header_hash(opened.header_bytes))
        with _PayloadSink(fd, cs) as sink:
            outs = [sink.buffer() for _ in range(_BUFFERS)]
            # Two workers, each running its jobs in order: the writer authenticates chunk i (raises unless
            # authentic), then appends its plaintext — so the file stays a prefix of verified chunks — and
            # hands it to the hasher, which hashes it while the writer goes on with chunk i+1 and chunk i+2
            # arrives (SHA-256, AES-GCM and the write each run on their own core where there is one:
            # hashlib, the AEAD and os.write release the GIL on large buffers). The hashes cover exactly
            # what was written, in order. A plaintext buffer is reused only once its chunk is written and
            # hashed (at most _BUFFERS - 1 chunks are outstanding when the next one is handed over).
            writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memfed-sync-write")
            hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memfed-sync-hash")

            def hash_plain(plain: memoryview) -> None:
                sha.update(plain)
                xxh.update(plain)

            def keep(index: int, last: bool, data: memoryview) -> Future[None]:
                out = outs[index % _BUFFERS]
                plain = dec.decrypt_into(index, last, data, out)
                if fmt is not None:
                    fmt.feed(plain)
                sink.append(out, len(plain))
                return hasher.submit(hash_plain, plain)

            writing: deque[Future[Future[None]]] = deque()  # chunks being authenticated and written
            hashing: deque[Future[None]] = deque()  # chunks written, being hashed (all older than writing)

            def settle(limit: int) -> None:
                """Retire finished chunks (raising their errors); wait on the oldest while more than
                ``limit`` are outstanding."""
                while True:
                    if writing and writing[0].done():
                        hashing.append(writing.popleft().result())
                    elif hashing and hashing[0].done():
                        hashing.popleft().result()
                    elif len(writing) + len(hashing) <= limit:
                        return
                    elif hashing:
                        hashing.popleft().result()
                    else:
                        hashing.append(writing.popleft().result())

            received = 0
            expect = start
            try:
                for c in stream:
                    if not isinstance(c, ChunkView) or c.index != expect:
                        raise IntegrityError(f"the holder sent {_body(c)} where chunk {expect} belongs")
                    last = expect == e.chunk_count - 1
                    size = chunk_plain_len(expect, e.plaintext_size, cs) + TAG_BYTES
                    data = c.data
                    if c.last != last or len(data) != size:
                        raise IntegrityError(f"chunk {expect} has the wrong size or last flag")
                    settle(_BUFFERS - 1)
                    writing.append(writer.submit(keep, expect, last, data))
                    expect += 1
                    received += 1
                    if self.chunk_delay_s:
                        time.sleep(self.chunk_delay_s)
                settle(0)
            except OSError as exc:  # the disk, not the holder: ENOSPC, EIO, ...
                raise StorageError(
                    f"cannot write the partial transfer file: {exc.strerror}",
                    hint="free space or fix the disk, then sync again: it resumes from the last whole "
                    "chunk written",
                ) from None
            finally:
                writer.shutdown(wait=True, cancel_futures=True)  # first: its jobs hand work to the hasher
                hasher.shutdown(wait=True, cancel_futures=True)
        if expect != e.chunk_count:
            raise UnavailableError(
                f"the transfer of {ref_string(m)} stopped at chunk {expect} of {e.chunk_count}",
                hint="sync again: it resumes from there",
            )
        if format_digest(sha.digest()) != got_m.digest:
            raise IntegrityError(
                f"decrypted payload hashes to {format_digest(sha.digest())}, not the signed digest "
                f"{got_m.digest}; nothing was stored",
                hint="the producer sealed other bytes than it signed (or the partial file was damaged); "
                "sync again to start over",
            )
        if later is not None:
            raise later
        if fmt is not None and (problem := fmt.result()) is not None:
            raise problem  # weights must be safetensors (never a pickle)
        return received, sha.digest(), xxh.digest()

    # -- revocations --------------------------------------------------------------------------------------

    def refresh_revocations(self, verifier: Any) -> int:
        ids = self.registry.revocations()
        verifier.revoke(ids)
        return len(ids)


@dataclass(frozen=True)
class _Partial:
    """The two files of an unfinished transfer: the sealed header, and the verified plaintext so far."""

    header: Path
    payload: Path

    def remove(self) -> None:
        self.payload.unlink(missing_ok=True)
        self.header.unlink(missing_ok=True)

    def clear(self, fd: int) -> None:
        """Start over in the (locked, open) payload file ``fd``: no header, no chunks."""
        self.header.unlink(missing_ok=True)
        os.ftruncate(fd, 0)


class _RestartNeeded(Exception):
    """The partial file belongs to another sealed stream (the holder resealed): start from chunk 0."""


def _resume_point(part: _Partial, fd: int) -> tuple[bytes | None, int]:
    """(saved envelope prefix, whole chunks kept) of a partial transfer; the payload file ``fd`` is
    trimmed to those chunks. The last chunk is never counted as kept: the stream must end with a live
    one."""
    try:
        saved = part.header.read_bytes()
        header, data = read_header(io.BytesIO(saved))
    except (FileNotFoundError, MemfedError):  # none yet, or torn: start over
        part.clear(fd)
        return None, 0
    e = header.encryption
    full = min(os.fstat(fd).st_size // e.chunk_size, max(0, e.chunk_count - 1))
    os.ftruncate(fd, full * e.chunk_size)
    return saved[: PREFIX_BYTES + len(data)], full


def _rehash_kept(
    fd: int, size: int, chunk: int, hashes: tuple[Any, ...], fmt: PayloadFormatCheck | None
) -> None:
    """Feed the kept prefix of a resumed transfer's payload file to the hashes (and the format check)."""
    buf = memoryview(bytearray(chunk))
    done = 0
    while done < size:
        n = os.preadv(fd, [buf[: min(chunk, size - done)]], done)
        if not n:
            raise IntegrityError("the partial transfer file is shorter than its chunk count")
        view = buf[:n]
        if fmt is not None:
            fmt.feed(view)
        for h in hashes:
            h.update(view)
        done += n


def _write_all(fd: int, data: memoryview) -> None:
    off = 0
    while off < len(data):
        off += os.write(fd, data[off:])


_ALIGN = 4096  # O_DIRECT's alignment of buffers, offsets and lengths (the common logical block size)


class _PayloadSink:
    """Appends verified plaintext to the partial payload file, past the page cache where it can.

    With O_DIRECT (Linux, a filesystem that has it, a chunk size that is a multiple of 4 KiB) each
    chunk goes from its (page-aligned) buffer to the disk while the next ones arrive: no copy into the
    page cache, and the store's fsync at adoption finds nothing left to write. Through the page cache
    that fsync waited for the whole payload after the last chunk (about as long as the network part of
    a 64 MiB transfer). The last chunk is written padded to the alignment and the file cut back to the
    payload's size at ``close``; a receiver killed before that leaves a longer file, whose last chunk a
    resume never keeps (``_resume_point``). Elsewhere, or when the filesystem refuses, plain writes.
    """

    def __init__(self, fd: int, chunk_size: int) -> None:
        self.fd = fd
        self.size = os.fstat(fd).st_size  # the payload's bytes in the file (the kept prefix)
        self.flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        self.direct = False
        direct = getattr(os, "O_DIRECT", 0)
        if direct and chunk_size % _ALIGN == 0 and self.size % _ALIGN == 0:
            try:
                fcntl.fcntl(fd, fcntl.F_SETFL, self.flags | direct)
                self.direct = True
            except OSError:  # e.g. tmpfs: no direct I/O
                pass
        self.chunk_size = chunk_size

    def buffer(self) -> memoryview:
        """A chunk buffer this sink can write from (page-aligned: an anonymous mapping)."""
        if self.direct:  # the chunk size is a multiple of the alignment then
            return memoryview(mmap.mmap(-1, self.chunk_size))
        return memoryview(bytearray(self.chunk_size))

    def append(self, buf: memoryview, n: int) -> None:
        """Append ``buf[:n]`` (a buffer from ``buffer``)."""
        if self.direct:
            try:
                _write_all(self.fd, buf[: -(-n // _ALIGN) * _ALIGN])
                self.size += n
                return
            except OSError as exc:  # refused (O_DIRECT not allowed here): go on through the page cache
                if exc.errno != errno.EINVAL:
                    raise
                self._buffered()
        _write_all(self.fd, buf[:n])
        self.size += n

    def _buffered(self) -> None:
        if self.direct:
            fcntl.fcntl(self.fd, fcntl.F_SETFL, self.flags)
            self.direct = False
            os.ftruncate(self.fd, self.size)  # a padded last chunk written before

    def close(self) -> None:
        """Back to plain I/O, the file exactly the payload's bytes written so far."""
        self._buffered()

    def __enter__(self) -> _PayloadSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _body(msg: Any) -> str:
    """What a stream message that is not the expected one holds, for the error message."""
    if isinstance(msg, ChunkView):
        return f"chunk {msg.index}"
    return msg.WhichOneof("body") or "an unreadable message"


def _open_locked(path: Path) -> int:
    """Open (creating) the partial payload file and lock it: one receiver per partial file, since a
    second sync of the same version (the background loop and a ``memfed sync``) would interleave its
    chunks with ours. The lock is taken on the file that is at ``path`` *after* locking: a receiver
    that opened it just before another one's store adopted (renamed) it must not write into the store's
    copy, so it opens again."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UnavailableError(
                    f"another sync is receiving {path.name} right now", hint="try again when it has finished"
                ) from None
            raise
        st = os.fstat(fd)
        try:
            here = os.stat(path)
        except FileNotFoundError:
            here = None
        if here is not None and (here.st_dev, here.st_ino) == (st.st_dev, st.st_ino):
            return fd
        os.close(fd)  # adopted (or removed) between our open and our lock: not ours to write


def _check_against_catalog(got: CubeManifest, catalog: CubeManifest) -> None:
    if (got.cube_id, got.version, list(got.version_chain)) != (
        catalog.cube_id, catalog.version, list(catalog.version_chain),
    ):  # fmt: skip
        raise IntegrityError(
            f"the holder sent {ref_string(got)} (chain {list(got.version_chain)}) where the catalog lists "
            f"{ref_string(catalog)} (chain {list(catalog.version_chain)}): mix-and-match refused"
        )
    if got.digest != catalog.digest and WM_SCHEME not in got.annotations:
        raise IntegrityError(
            f"the holder's {ref_string(got)} has digest {got.digest}, not the catalog's {catalog.digest}"
        )


def check_cube_ids(cube_ids: list[str]) -> list[str]:
    if not cube_ids:
        raise InvalidArgumentError("name at least one cube to sync", hint="memfed sync CUBE_ID ...")
    return cube_ids


async def sync_loop(
    syncer: Syncer, cube_ids: list[str], interval_s: float, verifier: Any | None, stop: Any
) -> None:
    """``memfed node serve``'s background sync: every ``interval_s``, refresh the token revocation list
    and bring each subscribed cube to its newest version. Failures are logged and retried next round."""
    import asyncio
    import contextlib

    while not stop.is_set():
        if verifier is not None:
            try:
                await asyncio.to_thread(syncer.refresh_revocations, verifier)
            except MemfedError as exc:
                log.warning("cannot refresh revocations: %s", exc)
        for cube_id in cube_ids:
            try:
                result = await asyncio.to_thread(syncer.sync, cube_id)
                if result.status == "synced":
                    log.info("sync: %s", result.to_dict())
            except MemfedError as exc:
                log.warning("sync of %s: %s: %s", cube_id, type(exc).__name__, exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
