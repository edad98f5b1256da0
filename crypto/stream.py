"""Chunked AES-256-GCM in the STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizár 2015).

Each chunk is sealed with nonce = 7-byte stream prefix ‖ 32-bit big-endian chunk index ‖ last-chunk
flag, and associated data = context ‖ SHA-256 of the sealed file's header ‖ 64-bit index ‖ last flag.
So each chunk is authenticated as "chunk i of this stream, (not) the last one, under this header":

- reordering or duplicating chunks changes the index a chunk is opened at → tag failure;
- truncating at a chunk boundary leaves a chunk that was not sealed as last where the last is expected;
- splicing a chunk from another export fails twice over: another content key, another stream prefix,
  and another header hash;
- editing any header field (chunk size, sizes, recipients) changes the header hash → chunk 0 fails.

The content key is fresh per export, so (key, nonce) pairs never repeat. Work happens in caller-owned
buffers (``encrypt_into``/``decrypt_into``): no allocation per chunk, which matters more than the AES
itself at these speeds (see FIELD-NOTES).
"""

from __future__ import annotations

import hashlib
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from memfed.errors import IntegrityError

CIPHER = "aes-256-gcm-stream"
TAG_BYTES = 16
STREAM_ID_BYTES = 16
DEFAULT_CHUNK_SIZE = 1 << 20
MIN_CHUNK_SIZE = 256
MAX_CHUNK_SIZE = 64 << 20  # bounds the memory an opener commits to before authenticating anything
MAX_CHUNKS = 1 << 32  # the nonce's counter width
_AAD_CONTEXT = b"memfed mcube v1 chunk\0"
_AAD = struct.Struct(">QB")
_NONCE = struct.Struct(">IB")


def chunk_count(plaintext_size: int, chunk_size: int) -> int:
    """Chunks a payload is cut into. An empty payload is one empty (last) chunk, so even it is
    authenticated and cannot be truncated away."""
    return max(1, -(-plaintext_size // chunk_size))


def ciphertext_size(plaintext_size: int, chunk_size: int) -> int:
    return plaintext_size + TAG_BYTES * chunk_count(plaintext_size, chunk_size)


def chunk_plain_len(index: int, plaintext_size: int, chunk_size: int) -> int:
    """Plaintext bytes in chunk ``index`` (the last may be shorter)."""
    n = chunk_count(plaintext_size, chunk_size)
    return chunk_size if index < n - 1 else plaintext_size - (n - 1) * chunk_size


class _StreamCipher:
    def __init__(self, key: bytes, stream_id: bytes, header_hash: bytes) -> None:
        if len(key) != 32 or len(stream_id) != STREAM_ID_BYTES or len(header_hash) != 32:
            raise ValueError("STREAM needs a 32-byte key, 16-byte stream id and 32-byte header hash")
        self._aead = AESGCM(key)
        # The prefix uses all 16 random bytes of the stream id, squeezed into the nonce's 7.
        self._prefix = hashlib.sha256(b"memfed mcube v1 nonce\0" + stream_id).digest()[:7]
        self._aad_prefix = _AAD_CONTEXT + header_hash

    def _nonce_aad(self, index: int, last: bool) -> tuple[bytes, bytes]:
        if not 0 <= index < MAX_CHUNKS:
            raise ValueError(f"chunk index {index} out of range")
        return self._prefix + _NONCE.pack(index, last), self._aad_prefix + _AAD.pack(index, last)


class StreamEncryptor(_StreamCipher):
    """Seal chunks one at a time into a caller's buffer."""

    def encrypt_into(self, index: int, last: bool, plaintext: memoryview, out: memoryview) -> memoryview:
        """Write ciphertext‖tag of ``plaintext`` into ``out`` (at least len + 16 bytes); return that
        part of ``out``."""
        nonce, aad = self._nonce_aad(index, last)
        n = len(plaintext) + TAG_BYTES
        self._aead.encrypt_into(nonce, plaintext, aad, out[:n])
        return out[:n]


class StreamDecryptor(_StreamCipher):
    """Open chunks one at a time into a caller's buffer; a chunk is only returned once authenticated."""

    def decrypt_into(self, index: int, last: bool, ciphertext: memoryview, out: memoryview) -> memoryview:
        n = len(ciphertext) - TAG_BYTES
        if n < 0:
            raise IntegrityError(f"chunk {index} is shorter than its authentication tag (truncated)")
        nonce, aad = self._nonce_aad(index, last)
        try:
            self._aead.decrypt_into(nonce, ciphertext, aad, out[:n])
        except InvalidTag:
            raise IntegrityError(
                f"payload chunk {index} fails authentication: it was altered, reordered, duplicated, "
                "truncated or spliced from another export (or the header was altered)",
                hint="nothing was stored; fetch the .mcube file again",
            ) from None
        return out[:n]
