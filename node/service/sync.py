"""Sync: pull the newest version of a subscribed cube from a node that holds it, sealed and resumable.

    syncer = Syncer(store=store, identity=ident, registry=reg_client, tls=TlsFiles.from_dir(...),
                    node_id="node-b", host_fingerprint=lambda: node.fingerprint, partial_dir=...)
    result = syncer.sync("legal_expert")

Steps: a signed catalog answer from the registry (verified: signature, expiry, sequence) names the
newest version and its holders; the registry issues a capability token for ``export`` (or refuses, and
audits it); the holder streams the cube sealed for this node over mutual TLS (the holder's certificate
must carry the holder's node id). Every chunk is authenticated (AES-GCM) *before* it is appended to a
partial file outside the store; a transfer cut anywhere — the process killed, the link dropped —
resumes from the last verified chunk, since the holder re-sends the same sealed stream. While the
chunks arrive, a second thread runs the full import (envelope, signature, digest, base model,
watermark: ``open_into_store``) over the saved chunks and then the live ones, so the store's copy is
written in parallel with the partial file; the store installs it only when the stream ended and every
check passed. The store never holds a partial cube; the partial file is removed once the cube is in.

The received manifest must be the catalog's version: same cube, version and version chain
(mix-and-match), and the same digest unless the holder watermarked it for us (then the manifest says so
in its signed annotations).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc

from memfed.client import CHANNEL_OPTIONS, error_from_rpc
from memfed.crypto.envelope import PREFIX_BYTES, encode_header, header_hash, read_header
from memfed.crypto.identity import Identity
from memfed.crypto.seal import WM_SCHEME, open_header, open_into_store
from memfed.crypto.signing import TrustedKeys
from memfed.crypto.stream import TAG_BYTES, StreamDecryptor, chunk_plain_len
from memfed.cube.manifest import CubeManifest, manifest_from_bytes, ref_string
from memfed.errors import IntegrityError, InvalidArgumentError, MemfedError, NotFoundError, UnavailableError
from memfed.mip.v1 import node_service_pb2, node_service_pb2_grpc
from memfed.node.service.sealed import public_identity_of
from memfed.registry.tls import TlsFiles
from memfed.registry_client import RegistryClient

pb = node_service_pb2
log = logging.getLogger("memfed.node.sync")
# The partial file is not fsynced: it only has to survive the receiving process (the kernel keeps its
# pages), and after a power loss a damaged tail fails authentication on import and the transfer starts
# over. The store's copy is durable as always (temp file, fsync, rename).


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

    def _partial_path(self, m: CubeManifest) -> Path:
        return self.partial_dir / f"{m.cube_id}@{m.version}.mcube.part"

    def _pull(self, m: CubeManifest, holder: str, token: pb.CapabilityToken) -> SyncResult:
        ident = self.registry.get_node(holder)
        if not ident.address:
            raise UnavailableError(f"holder {holder!r} registered no address")
        trusted = TrustedKeys([public_identity_of(ident)])
        self.partial_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self._partial_path(m)
        t0 = time.perf_counter()
        for attempt in range(2):
            saved, start = _resume_point(path)
            try:
                got, stored = self._stream(m, ident, token, trusted, path, saved, start)
            except _RestartNeeded:
                path.unlink(missing_ok=True)
                if attempt:
                    raise UnavailableError("the holder changed its sealed stream twice; try again") from None
                continue
            except IntegrityError:
                path.unlink(missing_ok=True)  # corrupt: start over next time
                raise
            break
        path.unlink(missing_ok=True)
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
        self, m: CubeManifest, ident: Any, token: pb.CapabilityToken, trusted: TrustedKeys, path: Path,
        saved: bytes | None, start: int,
    ) -> tuple[int, CubeManifest]:  # fmt: skip
        req = pb.FetchCubeRequest(
            ref=pb.CubeRef(cube_id=m.cube_id, version=m.version, digest=m.digest),
            capability=token,
            recipient_id=self.identity.recipient_id,
            resume_from_chunk=start,
            chunk_size=self.chunk_size,
        )
        received = 0
        with self._channel(ident) as ch:
            stub = node_service_pb2_grpc.NodeServiceStub(ch)
            try:
                stream = stub.FetchCube(req, timeout=self.timeout_s)
                first = next(stream)
                if first.WhichOneof("body") != "sealed_header":
                    raise IntegrityError("the holder did not start its stream with a sealed header")
                prefix = encode_header(first.sealed_header)
                if saved is not None and prefix != saved:
                    raise _RestartNeeded
                opened = open_header(io.BytesIO(prefix), self.identity, trusted)
                _check_against_catalog(opened.manifest, m)
                e = opened.header.encryption
                dec = StreamDecryptor(opened.content_key, e.stream_id, header_hash(prefix[PREFIX_BYTES:]))
                scratch = memoryview(bytearray(e.chunk_size))
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
                # One writer thread authenticates and appends chunk i while chunk i+1 arrives (both
                # release the GIL on large buffers); it runs jobs in order, so the file stays a prefix
                # of verified chunks. At most two chunks are in flight.
                writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memfed-sync-write")
                pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memfed-sync-import")
                pending: deque[Future[None]] = deque()

                def keep(index: int, last: bool, data: bytes) -> None:
                    dec.decrypt_into(index, last, memoryview(data), scratch)  # raises unless authentic
                    os.write(fd, data)

                # The store imports while the bytes arrive: a second thread runs the full import
                # (open_into_store: signature, digest, base model, watermark; temp file, rename) over a
                # pipe fed with the saved chunks, then each live one, so the partial file (for resume)
                # and the store's copy are written in parallel. A cut stream fails the pipe, and the
                # store discards its temp file.
                pipe = _ChunkPipe()
                importer = pool.submit(self._import, pipe, trusted)
                try:
                    pipe.put(prefix)
                    if saved is None:
                        os.write(fd, prefix)
                    else:
                        _feed_saved(path, len(prefix), start, e, pipe)
                    expect = start
                    for msg in stream:
                        c = msg.chunk
                        if msg.WhichOneof("body") != "chunk" or c.index != expect:
                            raise IntegrityError(
                                f"the holder sent {msg.WhichOneof('body')} where chunk {expect} belongs"
                            )
                        last = expect == e.chunk_count - 1
                        size = chunk_plain_len(expect, e.plaintext_size, e.chunk_size) + TAG_BYTES
                        if c.last != last or len(c.data) != size:
                            raise IntegrityError(f"chunk {expect} has the wrong size or last flag")
                        pending.append(writer.submit(keep, expect, last, c.data))
                        while len(pending) > 2 or (pending and pending[0].done()):
                            pending.popleft().result()
                        pipe.put(c.data)
                        if importer.done():
                            importer.result()  # the import failed early (e.g. digest): its error
                        expect += 1
                        received += 1
                        if self.chunk_delay_s:
                            time.sleep(self.chunk_delay_s)
                    while pending:
                        pending.popleft().result()
                    if expect != e.chunk_count:
                        raise UnavailableError(
                            f"the transfer of {ref_string(m)} stopped at chunk {expect} of {e.chunk_count}",
                            hint="sync again: it resumes from there",
                        )
                    pipe.close()
                    stored = importer.result()
                except BaseException as exc:
                    pipe.fail(exc)
                    with contextlib.suppress(BaseException):
                        importer.result()
                    raise
                finally:
                    writer.shutdown(wait=True, cancel_futures=True)
                    pool.shutdown(wait=True)
                    os.close(fd)
            except grpc.RpcError as exc:
                raise error_from_rpc(exc, address=ident.address) from None
        return received, stored

    def _import(self, pipe: _ChunkPipe, trusted: TrustedKeys) -> CubeManifest:
        return open_into_store(
            pipe, self.store, self.identity, trusted, host_fingerprint=self.host_fingerprint
        )

    # -- revocations --------------------------------------------------------------------------------------

    def refresh_revocations(self, verifier: Any) -> int:
        ids = self.registry.revocations()
        verifier.revoke(ids)
        return len(ids)


class _ChunkPipe:
    """A read-only binary file fed from another thread: what ``open_into_store`` reads the sealed stream
    from while it arrives. ``fail`` makes the reader raise (the import then stores nothing)."""

    def __init__(self, depth: int = 8) -> None:
        self._q: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._buf = memoryview(b"")
        self._eof = False
        self._failed = threading.Event()
        self.reader_gone = threading.Event()  # the importer stopped (failed early): drop what comes

    def put(self, data: bytes) -> None:
        while not self._failed.is_set() and not self.reader_gone.is_set():
            try:
                self._q.put(data, timeout=0.5)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        self.put(_EOF)  # type: ignore[arg-type]

    def fail(self, exc: BaseException) -> None:
        self._failed.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._q.get_nowait()
        with contextlib.suppress(queue.Full):
            self._q.put_nowait(exc)

    def readinto(self, view: memoryview) -> int:
        done = 0
        while done < len(view):
            if not self._buf:
                if self._eof:
                    break
                item = self._q.get()
                if item is _EOF:
                    self._eof = True
                    break
                if isinstance(item, BaseException):
                    raise UnavailableError(f"the transfer stopped: {item}") from item
                self._buf = memoryview(item)  # type: ignore[arg-type]
            n = min(len(view) - done, len(self._buf))
            view[done : done + n] = self._buf[:n]
            self._buf = self._buf[n:]
            done += n
        return done

    def read(self, n: int = -1) -> bytes:
        out = bytearray(n)
        got = self.readinto(memoryview(out))
        return bytes(out[:got])


_EOF = object()


def _feed_saved(path: Path, prefix_len: int, chunks: int, e: Any, pipe: _ChunkPipe) -> None:
    """Replay the chunks a resumed transfer kept (verified when they arrived) into the import pipe."""
    stride = e.chunk_size + TAG_BYTES
    with open(path, "rb", buffering=0) as f:
        f.seek(prefix_len)
        for _ in range(chunks):
            data = f.read(stride)
            if len(data) != stride:
                raise IntegrityError("the partial transfer file is shorter than its chunk count")
            pipe.put(data)


class _RestartNeeded(Exception):
    """The partial file belongs to another sealed stream (the holder resealed): start from chunk 0."""


def _resume_point(path: Path) -> tuple[bytes | None, int]:
    """(saved envelope prefix, chunks kept) of a partial transfer, trimmed to whole chunks."""
    if not path.exists():
        return None, 0
    try:
        with open(path, "rb") as f:
            header, data = read_header(f)
    except MemfedError:
        path.unlink(missing_ok=True)
        return None, 0
    prefix_len = PREFIX_BYTES + len(data)
    e = header.encryption
    stride = e.chunk_size + TAG_BYTES
    size = path.stat().st_size
    full = min(max(0, (size - prefix_len) // stride), max(0, e.chunk_count - 1))
    os.truncate(path, prefix_len + full * stride)
    with open(path, "rb") as f:
        prefix = f.read(prefix_len)
    return prefix, full


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
