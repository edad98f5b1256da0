"""Wrap a content key for each recipient with HPKE (RFC 9180, base mode), and unwrap it.

Suites: X25519 + HKDF-SHA256 + AES-256-GCM (default), or the hybrid ML-KEM-768 + X25519 KEM with the
same KDF and AEAD, chosen by the *recipient's* identity: a recipient that published an ML-KEM key gets
the hybrid suite, so a cube sealed for it stays confidential even if X25519 falls to a future quantum
computer (harvest now, decrypt later). The HPKE ``info`` binds the stream id and the recipient id, so a
wrapped key cannot be moved into another sealed file or reassigned to another recipient.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hpke

from memfed.crypto.identity import Identity, KemSuiteName, PublicIdentity
from memfed.errors import IntegrityError, PermissionDeniedError
from memfed.mip.v1 import envelope_pb2

CONTENT_KEY_BYTES = 32
_INFO = b"memfed mcube v1 content-key\0"

_SUITES = {
    KemSuiteName.X25519: (
        envelope_pb2.KEM_SUITE_X25519_HKDF_SHA256_AES256GCM,
        hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
    ),
    KemSuiteName.MLKEM768_X25519: (
        envelope_pb2.KEM_SUITE_MLKEM768_X25519_HKDF_SHA256_AES256GCM,
        hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
    ),
}
_BY_NUMBER = {number: (name, suite) for name, (number, suite) in _SUITES.items()}


def _info(stream_id: bytes, recipient_id: str) -> bytes:
    return _INFO + stream_id + b"\0" + recipient_id.encode()


def wrap_key(content_key: bytes, recipient: PublicIdentity, stream_id: bytes) -> envelope_pb2.WrappedKey:
    """HPKE-seal ``content_key`` to ``recipient`` in the suite its identity names."""
    number, suite = _SUITES[recipient.suite]
    if recipient.suite is KemSuiteName.MLKEM768_X25519:
        assert recipient.mlkem_key is not None  # PublicIdentity.from_dict guarantees it
        pub = hpke.MLKEM768X25519PublicKey(recipient.mlkem_key, recipient.x25519_key)
    else:
        pub = recipient.x25519_key
    wrapped = suite.encrypt(content_key, pub, _info(stream_id, recipient.recipient_id))
    return envelope_pb2.WrappedKey(recipient_id=recipient.recipient_id, suite=number, wrapped=wrapped)


def unwrap_key(recipients: list[envelope_pb2.WrappedKey], identity: Identity, stream_id: bytes) -> bytes:
    """Find the entry addressed to ``identity`` and open it.

    PermissionDeniedError when no entry names us (sealed for someone else); IntegrityError when ours
    does not open (altered in transit, or moved from another file).
    """
    mine = [w for w in recipients if w.recipient_id == identity.recipient_id]
    if not mine:
        named = ", ".join(w.recipient_id[:16] for w in recipients[:8]) or "none"
        raise PermissionDeniedError(
            f"this cube is not sealed for identity {identity.public.fingerprint} (recipients: {named})",
            hint="ask the producer to export it for your public identity (memfed identity show)",
        )
    entry = mine[0]
    found = _BY_NUMBER.get(entry.suite)
    if found is None or found[0] is not identity.public.suite:
        raise IntegrityError(
            f"the key wrapped for {identity.public.fingerprint} uses suite {entry.suite}, not this "
            f"identity's {identity.public.suite.value}"
        )
    name, suite = found
    if name is KemSuiteName.MLKEM768_X25519:
        assert identity.mlkem_key is not None
        priv = hpke.MLKEM768X25519PrivateKey(identity.mlkem_key, identity.x25519_key)
    else:
        priv = identity.x25519_key
    try:
        key = suite.decrypt(entry.wrapped, priv, _info(stream_id, identity.recipient_id))
    except Exception as exc:  # InvalidTag, or ValueError for a malformed encapsulation
        raise IntegrityError(
            f"the content key wrapped for {identity.public.fingerprint} does not open: "
            "the header was altered or the key moved from another export"
        ) from exc
    if len(key) != CONTENT_KEY_BYTES:
        raise IntegrityError(f"unwrapped content key has {len(key)} bytes, not {CONTENT_KEY_BYTES}")
    return key
