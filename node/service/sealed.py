"""Serving sealed cube streams (FetchCube with ``recipient_id``): the .mcube format over MIP.

The node seals the cube for the authenticated caller's registered HPKE key (watermarked for that
recipient when it is a LoRA), once, into a cache file, and streams the file: the header first, then
each sealed chunk (ciphertext‖tag) as one ``Chunk``. Sealing once is what makes transfers resumable:
a receiver that asks again with ``resume_from_chunk=k`` gets the same header (same content key, same
stream id) and the chunks from ``k`` on, so the chunks it verified and kept before still fit.

The recipient is never taken from the request alone: ``recipient_id`` must be the id of the identity
the registry holds for the caller's certificate name, so a node cannot have a cube sealed for a third
party (whose watermark would then blame the wrong recipient).
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

from memfed.crypto.envelope import PREFIX_BYTES, encode_header, header_hash, read_header
from memfed.crypto.identity import Identity, KemSuiteName, PublicIdentity
from memfed.crypto.seal import build_header, manifest_for_export
from memfed.crypto.stream import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    TAG_BYTES,
    StreamEncryptor,
    chunk_plain_len,
)
from memfed.cube.manifest import CubeManifest
from memfed.errors import (
    AuthenticationError,
    IntegrityError,
    InvalidArgumentError,
    PermissionDeniedError,
    UnsupportedError,
)
from memfed.mip.v1 import cube_pb2, node_service_pb2
from memfed.mip.v1 import registry_service_pb2 as rpb
from memfed.node.service import serde
from memfed.registry.tls import peer_of

pb = node_service_pb2
RecipientLookup = Callable[[str], rpb.NodeIdentity]
MAX_CACHED_HEADERS = 256


def public_identity_of(ident: rpb.NodeIdentity) -> PublicIdentity:
    """The sealing identity of a registered node (X25519 suite)."""
    if ident.kem_suite != KemSuiteName.X25519.value:
        raise UnsupportedError(
            f"node {ident.node_id!r} receives with {ident.kem_suite!r}; sync seals with X25519 only",
            hint="register the node with a classic (non --pq) identity for sync",
        )
    return PublicIdentity(
        ed25519.Ed25519PublicKey.from_public_bytes(ident.signing_public_key),
        KemSuiteName.X25519,
        x25519.X25519PublicKey.from_public_bytes(ident.kem_public_key),
        name=ident.node_id,
    )


# Room before a sealed chunk's ciphertext for its message prefix (serde.chunk_wire_prefix: at most 35).
_PREFIX_ROOM = 64


class SealedSource:
    """Seals cubes for callers and streams the sealed bytes, resumably."""

    def __init__(self, node: Any, identity: Identity, lookup: RecipientLookup, cache_dir: Path) -> None:
        self.node = node
        self.identity = identity
        self.lookup = lookup
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._locks: dict[Path, threading.Lock] = {}
        self._guard = threading.Lock()
        self._recipients: dict[str, PublicIdentity] = {}
        self._headers: collections.OrderedDict[tuple[Any, ...], tuple[Any, bytes, bytes]] = (
            collections.OrderedDict()
        )

    def recipient(self, context: Any, recipient_id: str) -> PublicIdentity:
        peer = peer_of(context)
        if peer is None:
            raise AuthenticationError(
                "sealed fetches need mutual TLS: the node seals for the caller's registered identity"
            )
        pub = self._recipients.get(peer.name)
        if pub is None:
            pub = public_identity_of(self.lookup(peer.name))
            self._recipients[peer.name] = pub
        if pub.recipient_id != recipient_id:
            raise PermissionDeniedError(
                f"recipient_id {recipient_id!r} is not the registered identity of the caller {peer.name!r}",
                hint="a node fetches sealed cubes for itself only",
            )
        return pub

    def prepare(self, m: CubeManifest, recipient: PublicIdentity, chunk_size: int = 0) -> Path:
        """The sealed file for (cube version, recipient, chunk size), sealing it on first use."""
        from memfed.crypto.exchange import export_cube

        cs = chunk_size or DEFAULT_CHUNK_SIZE
        if not MIN_CHUNK_SIZE <= cs <= MAX_CHUNK_SIZE:
            raise InvalidArgumentError(f"chunk_size {cs} outside {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}")
        name = f"{m.cube_id}@{m.version}-{m.digest[7:23]}-{recipient.recipient_id}-{cs}.mcube"
        path = self.cache_dir / name
        with self._guard:
            lock = self._locks.setdefault(path, threading.Lock())
        with lock:
            if not path.exists():
                export_cube(
                    self.node.store, m.cube_id, m.version, self.identity, [recipient], path, chunk_size=cs
                )
        return path

    async def stream(self, path: Path, resume_from: int) -> AsyncIterator[pb.CubeStreamMessage | bytes]:
        f = await asyncio.to_thread(open, path, "rb", buffering=0)
        try:
            header, data = await asyncio.to_thread(read_header, f)
            e = header.encryption
            if resume_from > e.chunk_count:
                raise InvalidArgumentError(
                    f"resume_from_chunk {resume_from} is past the last chunk ({e.chunk_count} chunks)",
                    hint="start again from chunk 0",
                )
            yield pb.CubeStreamMessage(sealed_header=header)
            prefix = PREFIX_BYTES + len(data)
            stride = e.chunk_size + TAG_BYTES
            await asyncio.to_thread(f.seek, prefix + resume_from * stride)
            for i in range(resume_from, e.chunk_count):
                n = chunk_plain_len(i, e.plaintext_size, e.chunk_size) + TAG_BYTES
                chunk = await asyncio.to_thread(f.read, n)
                yield serde.chunk_wire_prefix(i, len(chunk), i == e.chunk_count - 1) + chunk
        finally:
            f.close()

    async def fetch(
        self, m: CubeManifest, request: pb.FetchCubeRequest, context: Any
    ) -> AsyncIterator[pb.CubeStreamMessage | bytes]:
        recipient = await asyncio.to_thread(self.recipient, context, request.recipient_id)
        if m.kind == cube_pb2.CUBE_KIND_LORA:  # watermarked per recipient: sealed once into a file
            path = await asyncio.to_thread(self.prepare, m, recipient, request.chunk_size)
            stream = self.stream(path, request.resume_from_chunk)
        else:
            stream = self.stream_direct(m, recipient, request.chunk_size, request.resume_from_chunk)
        async for msg in stream:
            yield msg

    def header_for(
        self, m: CubeManifest, recipient: PublicIdentity, chunk_size: int
    ) -> tuple[Any, bytes, bytes]:
        """(header, envelope prefix, content key) of the sealed stream of ``m`` for ``recipient``, made
        once and kept in memory, so a resumed transfer continues the very same stream."""
        cs = chunk_size or DEFAULT_CHUNK_SIZE
        key = (m.cube_id, m.version, m.digest, recipient.recipient_id, cs)
        with self._guard:
            hit = self._headers.get(key)
            if hit is not None:
                self._headers.move_to_end(key)
                return hit
        header, content_key = build_header(manifest_for_export(m), self.identity, [recipient], chunk_size=cs)
        made = (header, encode_header(header), content_key)
        with self._guard:
            self._headers[key] = made
            while len(self._headers) > MAX_CACHED_HEADERS:
                self._headers.popitem(last=False)
        return made

    async def stream_direct(
        self, m: CubeManifest, recipient: PublicIdentity, chunk_size: int, resume_from: int
    ) -> AsyncIterator[pb.CubeStreamMessage | bytes]:
        """Seal on the fly from the store's payload file: no sealed copy is written. Re-sealing chunk i
        under the same key, stream id and index gives the same bytes (the plaintext is the same), so
        resuming works without keeping the ciphertext."""
        header, prefix, content_key = await asyncio.to_thread(self.header_for, m, recipient, chunk_size)
        e = header.encryption
        if resume_from > e.chunk_count:
            raise InvalidArgumentError(
                f"resume_from_chunk {resume_from} is past the last chunk ({e.chunk_count} chunks)",
                hint="start again from chunk 0",
            )
        enc = StreamEncryptor(content_key, e.stream_id, header_hash(prefix[PREFIX_BYTES:]))
        f = await asyncio.to_thread(open, self.node.store.payload_path(m.digest), "rb", buffering=0)
        try:
            cs = e.chunk_size
            inbuf = memoryview(bytearray(cs))
            wire = memoryview(bytearray(_PREFIX_ROOM + cs + TAG_BYTES))
            f.seek(resume_from * cs)

            def seal(i: int) -> bytes:
                """Chunk i's encoded message: its prefix, then the ciphertext sealed right after it (one
                copy of the bytes in all, into the message gRPC sends)."""
                n = chunk_plain_len(i, e.plaintext_size, cs)
                got = f.readinto(inbuf[:n])
                if got != n:
                    raise IntegrityError(
                        f"the stored payload of {m.cube_id}@{m.version} is shorter than its manifest"
                    )
                last = i == e.chunk_count - 1
                prefix = serde.chunk_wire_prefix(i, n + TAG_BYTES, last)
                at = _PREFIX_ROOM - len(prefix)
                wire[at:_PREFIX_ROOM] = prefix
                enc.encrypt_into(i, last, inbuf[:n], wire[_PREFIX_ROOM:])
                return bytes(wire[at : _PREFIX_ROOM + n + TAG_BYTES])

            # Chunk i+1 is read and sealed on a worker thread while chunk i is being sent (one ahead:
            # ``seal`` reuses its buffers, and each message owns a copy of its bytes); the first chunk
            # while the header is.
            ahead: asyncio.Future[bytes] | None = None
            if resume_from < e.chunk_count:
                ahead = asyncio.ensure_future(asyncio.to_thread(seal, resume_from))
            try:
                yield pb.CubeStreamMessage(sealed_header=header)
                for i in range(resume_from, e.chunk_count):
                    assert ahead is not None
                    msg = await ahead
                    ahead = None
                    if i + 1 < e.chunk_count:
                        ahead = asyncio.ensure_future(asyncio.to_thread(seal, i + 1))
                    yield msg
            finally:
                if ahead is not None:  # the caller went away mid-stream: let the read finish first
                    await asyncio.gather(ahead, return_exceptions=True)
        finally:
            f.close()

    def __repr__(self) -> str:
        return f"SealedSource(cache={self.cache_dir})"
