"""The ``.mcube`` format: the sealed-cube envelope, also what MIP streams between nodes.

Layout::

    magic            8 bytes   b"MCUBE\\x00\\x01\\x00"
    header length    4 bytes   little-endian uint32, at most MAX_HEADER_BYTES
    header           SealedCubeHeader (protobuf, proto/memfed/mip/v1/envelope.proto)
    chunks           chunk_count ciphertexts, chunk i = plain_len(i) + 16 bytes, back to back

Chunk framing is implicit (every length follows from the header), so there is no per-chunk length to
lie about; the header itself is authenticated by every chunk's associated data (see stream.py). The
parser here only checks structure and limits, raising typed errors: IntegrityError for bytes that are
damaged or cut short, InvalidArgumentError for input that is not a sealed cube or exceeds a limit.
"""

from __future__ import annotations

import hashlib
import struct
from typing import BinaryIO

from google.protobuf.message import DecodeError

from memfed.crypto.signing import MAX_MANIFEST_BYTES
from memfed.crypto.stream import (
    CIPHER,
    MAX_CHUNK_SIZE,
    MAX_CHUNKS,
    MIN_CHUNK_SIZE,
    STREAM_ID_BYTES,
    chunk_count,
)
from memfed.errors import IntegrityError, InvalidArgumentError
from memfed.mip.v1 import envelope_pb2

MAGIC = b"MCUBE\x00\x01\x00"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 1 << 20
MAX_RECIPIENTS = 256
_LEN = struct.Struct("<I")
PREFIX_BYTES = len(MAGIC) + _LEN.size

SealedCubeHeader = envelope_pb2.SealedCubeHeader


def encode_header(header: SealedCubeHeader) -> bytes:
    """Magic + length + header bytes, checked against the limits a reader enforces."""
    data = header.SerializeToString(deterministic=True)
    if len(data) > MAX_HEADER_BYTES:
        raise InvalidArgumentError(
            f"sealed-cube header of {len(data):,} bytes exceeds the limit of {MAX_HEADER_BYTES:,}",
            hint="seal for fewer recipients or shrink the manifest",
        )
    return MAGIC + _LEN.pack(len(data)) + data


def header_hash(header_bytes: bytes) -> bytes:
    """What every chunk's associated data binds: SHA-256 of the header as serialized in the file."""
    return hashlib.sha256(b"memfed mcube v1 header\0" + header_bytes).digest()


def read_exact(f: BinaryIO, n: int, what: str) -> bytes:
    data = f.read(n)
    if data is None or len(data) != n:
        got = 0 if data is None else len(data)
        raise IntegrityError(f"sealed cube is truncated: {what} needs {n:,} bytes, only {got:,} remain")
    return data


def read_header(f: BinaryIO) -> tuple[SealedCubeHeader, bytes]:
    """Read and check the envelope's prefix and header; return the header and its exact bytes."""
    magic = f.read(len(MAGIC))
    if magic != MAGIC:
        if magic and MAGIC.startswith(magic) and len(magic) < len(MAGIC):
            raise IntegrityError("sealed cube is truncated inside its magic number")
        raise InvalidArgumentError(
            "not a sealed cube (.mcube): the file does not start with the MCUBE magic",
            hint="pass a file written by `memfed cube export`",
        )
    (n,) = _LEN.unpack(read_exact(f, _LEN.size, "the header length"))
    if n > MAX_HEADER_BYTES:
        raise InvalidArgumentError(
            f"sealed-cube header claims {n:,} bytes, over the limit of {MAX_HEADER_BYTES:,}",
            hint="the file is damaged or hostile",
        )
    data = read_exact(f, n, "the header")
    header = SealedCubeHeader()
    try:
        header.ParseFromString(data)
    except DecodeError as exc:
        raise IntegrityError(f"sealed-cube header does not parse (damaged): {exc}") from exc
    check_header(header)
    return header, data


def check_header(h: SealedCubeHeader) -> None:
    """Structural checks, before any cryptography: versions, limits, consistent sizes."""
    if h.format_version != FORMAT_VERSION:
        raise IntegrityError(
            f"sealed-cube format version {h.format_version} is not {FORMAT_VERSION}",
            hint="the header is damaged, or was written by a newer memfed",
        )
    if not h.HasField("signed_manifest") or not h.signed_manifest.manifest:
        raise IntegrityError("sealed-cube header holds no signed manifest")
    if len(h.signed_manifest.manifest) > MAX_MANIFEST_BYTES:
        raise InvalidArgumentError(
            f"signed manifest of {len(h.signed_manifest.manifest):,} bytes exceeds the limit of "
            f"{MAX_MANIFEST_BYTES:,}"
        )
    if not 0 < len(h.recipients) <= MAX_RECIPIENTS:
        raise IntegrityError(
            f"sealed cube names {len(h.recipients)} recipients (1..{MAX_RECIPIENTS} allowed)"
        )
    e = h.encryption
    if e.cipher != CIPHER:
        raise IntegrityError(f"payload cipher {e.cipher!r} is not {CIPHER!r}")
    if len(e.stream_id) != STREAM_ID_BYTES:
        raise IntegrityError(f"stream id has {len(e.stream_id)} bytes, not {STREAM_ID_BYTES}")
    if not MIN_CHUNK_SIZE <= e.chunk_size <= MAX_CHUNK_SIZE:
        raise IntegrityError(
            f"chunk size {e.chunk_size:,} is outside {MIN_CHUNK_SIZE:,}..{MAX_CHUNK_SIZE:,} bytes"
        )
    expected = chunk_count(e.plaintext_size, e.chunk_size)
    if e.chunk_count != expected or expected > MAX_CHUNKS:
        raise IntegrityError(
            f"header says {e.chunk_count} chunks, but {e.plaintext_size:,} bytes in chunks of "
            f"{e.chunk_size:,} make {expected}"
        )
