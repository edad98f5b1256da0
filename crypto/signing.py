"""Sign and verify manifests (``SignedManifest``): Ed25519 over the exact serialized bytes.

The signature covers the manifest bytes as they travel, never a re-serialization (protobuf does not
promise one canonical encoding across versions), and through the manifest the payload's SHA-256. The
signed message is prefixed with a context string so a signature made here can never be replayed as a
signature over something else the same key signs (domain separation).
"""

from __future__ import annotations

from collections.abc import Iterable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from memfed.crypto.identity import Identity, PublicIdentity, key_id_of
from memfed.cube.manifest import CubeManifest, manifest_from_bytes, manifest_to_bytes
from memfed.errors import AuthenticationError, IntegrityError, InvalidArgumentError, MemfedError
from memfed.mip.v1 import cube_pb2

ALGORITHM = "ed25519"
_CONTEXT = b"memfed SignedManifest v1\0"
MAX_MANIFEST_BYTES = 256 * 1024  # a manifest is metadata; anything bigger is an attack or a bug


class TrustedKeys:
    """The signing keys an importer accepts, by key id. Holding several per peer is how rotation works:
    a manifest names the key that signed it, and old keys stay trusted until removed."""

    def __init__(self, keys: Iterable[ed25519.Ed25519PublicKey | PublicIdentity] = ()) -> None:
        self._keys: dict[str, ed25519.Ed25519PublicKey] = {}
        for k in keys:
            self.add(k)

    def add(self, key: ed25519.Ed25519PublicKey | PublicIdentity) -> str:
        pub = key.signing_key if isinstance(key, PublicIdentity) else key
        kid = key_id_of(pub)
        self._keys[kid] = pub
        return kid

    def get(self, key_id: str) -> ed25519.Ed25519PublicKey | None:
        return self._keys.get(key_id)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def ids(self) -> list[str]:
        return sorted(self._keys)


def sign_manifest(manifest: CubeManifest, identity: Identity) -> cube_pb2.SignedManifest:
    """Serialize ``manifest`` once and sign those bytes."""
    data = manifest_to_bytes(manifest)
    if len(data) > MAX_MANIFEST_BYTES:
        raise InvalidArgumentError(
            f"manifest of {len(data):,} bytes exceeds the limit of {MAX_MANIFEST_BYTES:,}",
            hint="move bulky metadata out of annotations/origin",
        )
    return cube_pb2.SignedManifest(
        manifest=data,
        key_id=identity.key_id,
        algorithm=ALGORITHM,
        signature=identity.signing_key.sign(_CONTEXT + data),
    )


def verify_manifest(signed: cube_pb2.SignedManifest, trusted: TrustedKeys) -> CubeManifest:
    """Check the signature against the trusted keys, then parse the signed bytes.

    Raises AuthenticationError when the key is not trusted, IntegrityError when the signature does not
    verify (the manifest or signature was altered), InvalidArgumentError when oversize.
    """
    if len(signed.manifest) > MAX_MANIFEST_BYTES:
        raise InvalidArgumentError(
            f"signed manifest of {len(signed.manifest):,} bytes exceeds the limit of {MAX_MANIFEST_BYTES:,}"
        )
    if signed.algorithm != ALGORITHM:
        raise IntegrityError(f"manifest signature algorithm {signed.algorithm!r} is not {ALGORITHM!r}")
    key = trusted.get(signed.key_id)
    if key is None:
        raise AuthenticationError(
            f"manifest is signed by key {signed.key_id!r}, which is not among the trusted keys "
            f"({', '.join(trusted.ids()) or 'none'})",
            hint="if you trust the producer, pass its public identity with --trust FILE",
        )
    try:
        key.verify(signed.signature, _CONTEXT + signed.manifest)
    except InvalidSignature:
        raise IntegrityError(
            f"manifest signature by {signed.key_id} does not verify: the manifest or signature was altered",
            hint="fetch the cube again from its producer",
        ) from None
    try:
        return manifest_from_bytes(signed.manifest)
    except MemfedError as exc:  # signed but malformed: the producer's bug, still refuse
        raise IntegrityError(f"signed manifest is malformed: {exc.message}") from exc
