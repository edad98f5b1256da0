"""Seal a cube into a ``.mcube`` stream, and open one into the cube store.

Both directions stream in fixed-size chunks through a few reused buffers, so memory stays bounded by a
few chunk sizes whatever the payload's size (a 2 GB payload needs no 2 GB of RAM).

Opening verifies in this order, and writes nothing to the store until every check has passed:

1. envelope: magic, header limits and structure (envelope.py);
2. signature: the signed manifest against the trusted keys (signing.py), then the content key (hpke);
3. digest: every chunk is authenticated as it is decrypted, and the plaintext's SHA-256 is compared
   with the signed manifest's (by the store, which hashes what it writes on a worker thread, overlapped
   with decryption);
4. base model: the manifest's fingerprint against the host model's;
5. watermark: the (unsigned) watermark record in the header against the signed one in the manifest,
   and that we are among the recipients it was marked for.

The payload goes through ``CubeStore.put_stream``, which writes a temp file and renames it in only when
the stream ended cleanly and its digest matched, so a failure leaves the store unchanged. Checks 4 and 5
need only the manifest, so they are computed up front; when one fails, the payload is still decrypted
and hashed (not written) so that a digest failure is reported first, in the order above.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from memfed.crypto.envelope import PREFIX_BYTES, SealedCubeHeader, encode_header, header_hash, read_header
from memfed.crypto.hpke_wrap import CONTENT_KEY_BYTES, unwrap_key, wrap_key
from memfed.crypto.identity import Identity, PublicIdentity
from memfed.crypto.signing import TrustedKeys, sign_manifest, verify_manifest
from memfed.crypto.stream import (
    CIPHER,
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    STREAM_ID_BYTES,
    TAG_BYTES,
    StreamDecryptor,
    StreamEncryptor,
    chunk_count,
    chunk_plain_len,
)
from memfed.cube.digest import format_digest
from memfed.cube.fingerprint import describe, mismatch_reasons
from memfed.cube.manifest import PARAMETRIC_KINDS, CubeManifest, manifest_to_bytes, ref_string
from memfed.errors import (
    IncompatibleModelError,
    IntegrityError,
    InvalidArgumentError,
    MemfedError,
    StorageError,
    UnsupportedError,
)
from memfed.fsio import atomic_write
from memfed.mip.v1 import cube_pb2, envelope_pb2

if TYPE_CHECKING:
    from memfed.node.store import CubeStore

# Signed manifest annotations that record a watermark (so the importer can check the header's copy).
WM_SCHEME = "memfed.watermark.scheme"
WM_MARK_ID = "memfed.watermark.mark_id"
WM_RECIPIENTS = "memfed.watermark.recipients"

HostFingerprint = cube_pb2.BaseModelFingerprint | Callable[[], cube_pb2.BaseModelFingerprint] | None


@dataclass(frozen=True)
class SealResult:
    manifest: CubeManifest
    header: SealedCubeHeader
    bytes_written: int


# -- sealing --------------------------------------------------------------------------------------


def build_header(
    manifest: CubeManifest,
    identity: Identity,
    recipients: Sequence[PublicIdentity],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    watermark: envelope_pb2.WatermarkInfo | None = None,
) -> tuple[SealedCubeHeader, bytes]:
    """Sign the manifest, draw a fresh content key and stream id, wrap the key for each recipient."""
    if not recipients:
        raise InvalidArgumentError("a sealed cube needs at least one recipient", hint="pass --to PUBFILE")
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise InvalidArgumentError(f"chunk size {chunk_size} outside {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}")
    key = secrets.token_bytes(CONTENT_KEY_BYTES)
    stream_id = secrets.token_bytes(STREAM_ID_BYTES)
    size = manifest.payload.size_bytes
    header = SealedCubeHeader(
        format_version=1,
        signed_manifest=sign_manifest(manifest, identity),
        encryption=envelope_pb2.PayloadEncryption(
            cipher=CIPHER,
            stream_id=stream_id,
            chunk_size=chunk_size,
            plaintext_size=size,
            chunk_count=chunk_count(size, chunk_size),
        ),
        sender_id=identity.recipient_id,
    )
    seen: set[str] = set()
    for r in recipients:
        if r.recipient_id not in seen:  # the same peer twice would only grow the header
            seen.add(r.recipient_id)
            header.recipients.append(wrap_key(key, r, stream_id))
    if watermark is not None:
        header.watermark.CopyFrom(watermark)
    return header, key


def seal_to(
    out: BinaryIO,
    manifest: CubeManifest,
    payload: BinaryIO,
    identity: Identity,
    recipients: Sequence[PublicIdentity],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    watermark: envelope_pb2.WatermarkInfo | None = None,
) -> SealResult:
    """Write the sealed form of (``manifest``, ``payload``) to ``out``, streaming.

    ``payload`` must yield exactly ``manifest.payload.size_bytes`` bytes. The digest is not recomputed
    here: the store verified it when the payload went in, and the recipient checks it on open.
    """
    header, key = build_header(manifest, identity, recipients, chunk_size=chunk_size, watermark=watermark)
    prefix = encode_header(header)
    enc = StreamEncryptor(key, header.encryption.stream_id, header_hash(prefix[PREFIX_BYTES:]))
    out.write(prefix)
    written = len(prefix)
    e = header.encryption
    inbuf = bytearray(chunk_size)
    outbuf = bytearray(chunk_size + TAG_BYTES)
    in_view, out_view = memoryview(inbuf), memoryview(outbuf)
    for i in range(e.chunk_count):
        n = chunk_plain_len(i, e.plaintext_size, chunk_size)
        got = _readinto_full(payload, in_view[:n])
        if got != n:
            raise IntegrityError(
                f"payload of cube {ref_string(manifest)} ended after {i * chunk_size + got:,} bytes; its "
                f"manifest says {e.plaintext_size:,}"
            )
        out.write(enc.encrypt_into(i, i == e.chunk_count - 1, in_view[:n], out_view))
        written += n + TAG_BYTES
    if payload.read(1):
        raise IntegrityError(f"payload of cube {ref_string(manifest)} is longer than its manifest says")
    return SealResult(manifest, header, written)


def seal_file(
    path: Path,
    manifest: CubeManifest,
    payload: BinaryIO,
    identity: Identity,
    recipients: Sequence[PublicIdentity],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    watermark: envelope_pb2.WatermarkInfo | None = None,
) -> SealResult:
    """``seal_to`` a file, atomically: a temp file next to ``path``, fsync, rename, fsync the directory.
    A failed seal leaves no partial ``.mcube`` behind."""
    path = Path(path)
    try:
        # atomic_write's file is unbuffered: we hand whole chunks to write(); a buffer would only copy.
        with atomic_write(path) as f:
            result = seal_to(
                f, manifest, payload, identity, recipients, chunk_size=chunk_size, watermark=watermark
            )
    except OSError as exc:
        raise StorageError(f"cannot write sealed cube {path}: {exc.strerror}") from exc
    return result


def _readinto_full(f: BinaryIO, view: memoryview) -> int:
    """Fill ``view`` from ``f`` (raw files may return short reads); return how much was read."""
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])  # type: ignore[attr-defined]
        if not n:
            break
        done += n
    return done


# -- opening --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpenedHeader:
    """A sealed cube whose envelope and signature have been verified and whose key we hold."""

    header: SealedCubeHeader
    header_bytes: bytes
    manifest: CubeManifest
    content_key: bytes


def open_header(f: BinaryIO, identity: Identity, trusted: TrustedKeys) -> OpenedHeader:
    """Steps 1-2: envelope, signature, content key."""
    header, data = read_header(f)
    manifest = verify_manifest(header.signed_manifest, trusted)
    e = header.encryption
    if manifest.payload.size_bytes != e.plaintext_size:
        raise IntegrityError(
            f"sealed payload is {e.plaintext_size:,} bytes but the signed manifest of "
            f"{ref_string(manifest)} says {manifest.payload.size_bytes:,}"
        )
    key = unwrap_key(list(header.recipients), identity, e.stream_id)
    return OpenedHeader(header, data, manifest, key)


def _base_model_problem(manifest: CubeManifest, host: HostFingerprint) -> MemfedError | None:
    """Step 4, computed early, raised late (see the module docstring)."""
    if manifest.kind not in PARAMETRIC_KINDS:
        return None
    if host is None:
        return InvalidArgumentError(
            f"cube {ref_string(manifest)} holds weights; its base model must be checked before import",
            hint="pass the host model (--model DIR)",
        )
    actual = host() if callable(host) else host
    reasons = mismatch_reasons(manifest.base_model, actual)
    if not reasons:
        return None
    return IncompatibleModelError(
        f"cube {ref_string(manifest)} was made for {describe(manifest.base_model)} but the host model "
        f"is {describe(actual)}; they differ in: {', '.join(reasons)}; nothing was stored",
        hint="import it on a node hosting the base model it was made for",
    )


def _watermark_problem(opened: OpenedHeader, identity: Identity) -> MemfedError | None:
    """Step 5: the header's watermark record must agree with the signed one and include us."""
    ann = opened.manifest.annotations
    wm = opened.header.watermark
    signed_scheme = ann.get(WM_SCHEME, "")
    if not signed_scheme and not wm.scheme:
        return None  # exported without a mark (not a LoRA, or the owner chose not to)
    recipients = ann.get(WM_RECIPIENTS, "").split(",")
    if (
        wm.scheme != signed_scheme
        or wm.recipient_id != ann.get(WM_MARK_ID, "")
        or identity.recipient_id not in recipients
    ):
        return IntegrityError(
            f"watermark record of {ref_string(opened.manifest)} does not match its signed manifest "
            "(or was not made for this identity); nothing was stored",
            hint="the header was altered, or the cube was re-sealed by someone other than its owner",
        )
    return None


# A Python pickle starts with PROTO (0x80) and a protocol number; zip-based torch.save files with "PK".
_PICKLE_MAGICS = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")
MAX_SAFETENSORS_HEADER = 8 << 20  # what an opener buffers to check the format; LoRA headers are KBs


class PayloadFormatCheck:
    """Checks, as the chunks stream by, that a weights payload is safetensors (never a pickle).

    Only the safetensors header is buffered (bounded); the problem is kept, not raised, so the caller
    reports it in its order of checks.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.head = bytearray()
        self.need: int | None = None
        self.problem: MemfedError | None = None
        self.done = False

    def feed(self, chunk: memoryview) -> None:
        view = chunk
        while not self.done:
            want = 8 if self.need is None else self.need
            take = view[: max(0, want - len(self.head))]
            self.head += take
            view = view[len(take) :]
            if len(self.head) < want:
                return  # wait for the next chunk
            if self.need is None:
                if bytes(self.head[:5]).startswith(_PICKLE_MAGICS):
                    return self._fail(
                        UnsupportedError(
                            "payload is a Python pickle, which memfed never loads (it can run code); "
                            "nothing was stored",
                            hint="ask the producer for a safetensors payload",
                        )
                    )
                n = int.from_bytes(self.head[:8], "little")
                if n > MAX_SAFETENSORS_HEADER or 8 + n > self.size:
                    return self._fail(IntegrityError("payload is not a safetensors file (bad header length)"))
                self.need = 8 + n
                continue
            try:
                header = json.loads(bytes(self.head[8 : self.need]))
            except ValueError:
                header = None
            if not isinstance(header, dict):
                return self._fail(IntegrityError("payload's safetensors header is not a JSON object"))
            self.done = True
            self.head = bytearray()

    def _fail(self, problem: MemfedError) -> None:
        self.problem, self.done, self.head = problem, True, bytearray()

    def result(self) -> MemfedError | None:
        if self.problem is None and not self.done:
            return IntegrityError(f"payload of {self.size} bytes is too short for safetensors")
        return self.problem


def iter_plaintext(
    f: BinaryIO,
    opened: OpenedHeader,
    *,
    expected_digest: str | None = None,
    inspect: Callable[[memoryview], None] | None = None,
    finish: Callable[[], None] | None = None,
) -> Iterator[memoryview]:
    """Decrypt the chunks that follow the header, yielding authenticated plaintext views.

    Three output buffers rotate, so a view stays valid until two more have been yielded (the contract
    of ``CubeStore.put_stream``). With ``expected_digest`` the plaintext is also hashed with SHA-256 on a
    worker thread (one chunk in flight, overlapping decryption and the consumer's work; hashlib releases
    the GIL) and checked after the last chunk. ``finish()`` runs after every check and before the
    generator returns, so it can still refuse the stream.
    """
    e = opened.header.encryption
    dec = StreamDecryptor(opened.content_key, e.stream_id, header_hash(opened.header_bytes))
    cs = e.chunk_size
    inbuf = memoryview(bytearray(cs + TAG_BYTES))
    outs = [memoryview(bytearray(cs)) for _ in range(3)]
    sha = hashlib.sha256() if expected_digest is not None else None
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mcube-hash") if sha else None
    pending: Future[None] | None = None
    try:
        for i in range(e.chunk_count):
            last = i == e.chunk_count - 1
            n = chunk_plain_len(i, e.plaintext_size, cs) + TAG_BYTES
            got = _readinto_full(f, inbuf[:n])
            if got != n:
                raise IntegrityError(
                    f"sealed cube is truncated: chunk {i} of {e.chunk_count} has {got:,} of {n:,} bytes",
                    hint="nothing was stored; fetch the .mcube file again",
                )
            plain = dec.decrypt_into(i, last, inbuf[:n], outs[i % 3])
            if pool is not None and sha is not None:
                if pending is not None:
                    pending.result()
                pending = pool.submit(sha.update, plain)
            if inspect is not None:
                inspect(plain)
            yield plain
        if f.read(1):
            raise IntegrityError(
                "sealed cube has bytes after its last chunk (spliced or damaged)",
                hint="nothing was stored; fetch the .mcube file again",
            )
        if pending is not None:
            pending.result()
            pending = None
        if sha is not None and format_digest(sha.digest()) != expected_digest:
            raise IntegrityError(
                f"decrypted payload hashes to {format_digest(sha.digest())}, not the signed digest "
                f"{expected_digest}; nothing was stored",
                hint="the producer sealed other bytes than it signed; ask it to export again",
            )
        if finish is not None:
            finish()
    finally:
        if pending is not None:
            with contextlib.suppress(Exception):
                pending.result()
        if pool is not None:
            pool.shutdown(wait=True)


def open_into_store(
    f: BinaryIO,
    store: CubeStore,
    identity: Identity,
    trusted: TrustedKeys,
    *,
    host_fingerprint: HostFingerprint = None,
    check_watermark: bool = True,
) -> CubeManifest:
    """Open a sealed cube from ``f`` into ``store`` (see the module docstring for the order of checks).

    ``host_fingerprint`` is the host model's fingerprint (or a callable returning it, called only for
    cubes that hold weights). Returns the manifest as stored.
    """
    opened = open_header(f, identity, trusted)
    m = opened.manifest
    # Steps 4-5 need only the signed manifest, so they are computed now ...
    later = _base_model_problem(m, host_fingerprint) or (
        _watermark_problem(opened, identity) if check_watermark else None
    )
    if later is not None:
        # ... but a cube that will be refused is still decrypted and hashed (never written), so that a
        # digest failure is reported first, as the documented order says.
        for _ in iter_plaintext(f, opened, expected_digest=m.digest):
            pass
        raise later
    # The accepted path: the store hashes what it writes (SHA-256, on its own worker thread) and
    # refuses to install a payload whose digest is not the manifest's, so the digest check (step 3)
    # happens exactly once, overlapped with decryption; hashing here too would only double that cost.
    fmt = PayloadFormatCheck(m.payload.size_bytes) if m.kind in PARAMETRIC_KINDS else None

    def finish() -> None:
        if fmt is not None and (problem := fmt.result()) is not None:
            raise problem  # weights must be safetensors (never a pickle)

    chunks = iter_plaintext(f, opened, inspect=fmt.feed if fmt is not None else None, finish=finish)
    return store.put_stream(m, chunks)


def open_file(
    path: Path,
    store: CubeStore,
    identity: Identity,
    trusted: TrustedKeys,
    *,
    host_fingerprint: HostFingerprint = None,
    check_watermark: bool = True,
) -> CubeManifest:
    """``open_into_store`` for a ``.mcube`` file."""
    try:
        f = open(path, "rb", buffering=0)  # noqa: SIM115 (closed by the `with` below; errors mapped here)
    except FileNotFoundError:
        from memfed.errors import NotFoundError

        raise NotFoundError(f"no sealed cube file {path}") from None
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror}") from exc
    with f:
        return open_into_store(
            f, store, identity, trusted, host_fingerprint=host_fingerprint, check_watermark=check_watermark
        )


def manifest_for_export(manifest: CubeManifest) -> CubeManifest:
    """The manifest a recipient gets: lifecycle reset (it is the sender's local state)."""
    m = CubeManifest()
    m.CopyFrom(manifest)
    m.lifecycle = cube_pb2.LIFECYCLE_STATE_GENERATED
    manifest_to_bytes(m)  # fail early on anything unserializable
    return m
