"""Payload digests: ``"sha256:<64 hex>"``.

The algorithm is part of the string so a later format can name a faster hash without ambiguity.
"""

from __future__ import annotations

import hashlib
import re

from memfed.errors import IntegrityError, InvalidManifestError

ALGORITHM = "sha256"
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def payload_digest(data: bytes | bytearray | memoryview) -> str:
    """Digest string of a payload held in memory."""
    return format_digest(hashlib.sha256(data).digest())


def format_digest(raw: bytes) -> str:
    """Turn a raw 32-byte SHA-256 value into the manifest's digest string."""
    if len(raw) != 32:
        raise ValueError(f"a SHA-256 digest has 32 bytes, got {len(raw)}")
    return f"{ALGORITHM}:{raw.hex()}"


def check_digest_string(digest: str) -> str:
    """Return ``digest`` if well formed, else raise InvalidManifestError."""
    if not _DIGEST_RE.match(digest):
        raise InvalidManifestError(
            f"malformed digest {digest!r}", hint="expected 'sha256:' followed by 64 lowercase hex digits"
        )
    return digest


def digest_hex(digest: str) -> str:
    """The hex part of a digest string (used for content-addressed file names)."""
    return check_digest_string(digest).split(":", 1)[1]


def verify_digest(data: bytes | bytearray | memoryview, expected: str, *, what: str = "payload") -> None:
    """Raise IntegrityError if ``data`` does not hash to ``expected``."""
    actual = payload_digest(data)
    if actual != expected:
        raise IntegrityError(
            f"{what} digest mismatch: expected {expected}, got {actual}",
            hint="the bytes were corrupted, truncated or tampered with; fetch or restore the cube again",
        )
