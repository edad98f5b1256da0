"""Node identities: an Ed25519 signing key and an HPKE key pair, on disk with mode 0600.

Layout of an identity directory::

    signing.pem          Ed25519 private key, PKCS#8 PEM (encrypted when a passphrase was given)
    hpke-x25519.pem      X25519 private key (every identity has one)
    hpke-mlkem768.pem    ML-KEM-768 private key (only for the hybrid post-quantum suite)
    identity.pub.json    the public identity: both public keys, suite, key id and fingerprint

The public identity file is what a node hands to its peers: they seal cubes for it (HPKE public key) and
trust cubes it signs (signing public key). People compare the short fingerprint out of band.

Why one signing key id and a separate fingerprint: the key id names the *signing key* (a manifest records
it, so a node can rotate keys and verifiers look the right one up), while the fingerprint names the whole
public identity (both keys and the suite) and is what a sealed cube's recipients are addressed by.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, mlkem, x25519

from memfed.errors import (
    AlreadyExistsError,
    AuthenticationError,
    InvalidArgumentError,
    NotFoundError,
    StorageError,
)
from memfed.fsio import write_bytes_atomic

SIGNING_FILE = "signing.pem"
X25519_FILE = "hpke-x25519.pem"
MLKEM_FILE = "hpke-mlkem768.pem"
PUBLIC_FILE = "identity.pub.json"
PUBLIC_FORMAT = "memfed-identity-v1"
_PRIVATE_FILES = (SIGNING_FILE, X25519_FILE, MLKEM_FILE)


class KemSuiteName(StrEnum):
    """The HPKE suites an identity may receive with (values are the names in public identity files)."""

    X25519 = "x25519-hkdf-sha256-aes256gcm"
    MLKEM768_X25519 = "mlkem768-x25519-hkdf-sha256-aes256gcm"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise InvalidArgumentError(f"{what} is missing or not a string")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as exc:
        raise InvalidArgumentError(f"{what} is not valid base64") from exc


def key_id_of(signing_public: ed25519.Ed25519PublicKey) -> str:
    """The signing key's id: ``ed25519:`` + 16 hex digits of SHA-256 of the raw public key."""
    raw = signing_public.public_bytes_raw()
    return "ed25519:" + hashlib.sha256(b"memfed key id v1\0" + raw).hexdigest()[:16]


@dataclass(frozen=True)
class PublicIdentity:
    """What a peer needs to seal for this node and to verify what it signs."""

    signing_key: ed25519.Ed25519PublicKey
    suite: KemSuiteName
    x25519_key: x25519.X25519PublicKey
    mlkem_key: mlkem.MLKEM768PublicKey | None = None
    name: str = ""

    @property
    def key_id(self) -> str:
        return key_id_of(self.signing_key)

    def _digest(self) -> bytes:
        h = hashlib.sha256(b"memfed identity v1\0")
        h.update(self.signing_key.public_bytes_raw())
        h.update(self.suite.value.encode() + b"\0")
        h.update(self.x25519_key.public_bytes_raw())
        if self.mlkem_key is not None:
            h.update(self.mlkem_key.public_bytes_raw())
        return h.digest()

    @property
    def recipient_id(self) -> str:
        """Full id (32 hex digits) that sealed cubes address this identity by."""
        return self._digest()[:16].hex()

    @property
    def fingerprint(self) -> str:
        """Short form people compare aloud: ``1a2b-3c4d-5e6f-7a8b`` (the first 64 bits of the id)."""
        h = self.recipient_id[:16]
        return "-".join(h[i : i + 4] for i in range(0, 16, 4))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "format": PUBLIC_FORMAT,
            "name": self.name,
            "signing_key": _b64(self.signing_key.public_bytes_raw()),
            "key_id": self.key_id,
            "kem_suite": self.suite.value,
            "x25519_public": _b64(self.x25519_key.public_bytes_raw()),
            "recipient_id": self.recipient_id,
            "fingerprint": self.fingerprint,
        }
        if self.mlkem_key is not None:
            d["mlkem768_public"] = _b64(self.mlkem_key.public_bytes_raw())
        return d

    @classmethod
    def from_dict(cls, d: Any, *, source: str = "public identity") -> PublicIdentity:
        """Parse and check a public identity; the stated key id and fingerprint must match the keys."""
        if not isinstance(d, dict) or d.get("format") != PUBLIC_FORMAT:
            raise InvalidArgumentError(
                f"{source} is not a memfed public identity",
                hint=f"expected JSON with format {PUBLIC_FORMAT!r}",
            )
        try:
            suite = KemSuiteName(d.get("kem_suite"))
            signing = ed25519.Ed25519PublicKey.from_public_bytes(_unb64(d.get("signing_key"), "signing_key"))
            xpub = x25519.X25519PublicKey.from_public_bytes(_unb64(d.get("x25519_public"), "x25519_public"))
            mpub = None
            if suite is KemSuiteName.MLKEM768_X25519:
                raw = _unb64(d.get("mlkem768_public"), "mlkem768_public")
                mpub = mlkem.MLKEM768PublicKey.from_public_bytes(raw)
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise InvalidArgumentError(f"{source} holds a malformed key: {exc}") from exc
        ident = cls(signing, suite, xpub, mpub, name=str(d.get("name", "")))
        for field_name in ("key_id", "recipient_id"):
            stated = d.get(field_name)
            if stated is not None and stated != getattr(ident, field_name):
                raise InvalidArgumentError(
                    f"{source}: stated {field_name} {stated!r} does not match its keys",
                    hint="the file was edited or corrupted; ask the peer for it again",
                )
        return ident

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


def load_public_identity(path: Path) -> PublicIdentity:
    """Read a public identity file (``identity.pub.json``, or an identity directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / PUBLIC_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise NotFoundError(f"no public identity file at {path}") from None
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise InvalidArgumentError(f"{path} is not JSON: {exc}") from exc
    return PublicIdentity.from_dict(data, source=str(path))


@dataclass(frozen=True)
class Identity:
    """A node's private identity, loaded from its directory."""

    directory: Path
    signing_key: ed25519.Ed25519PrivateKey
    x25519_key: x25519.X25519PrivateKey
    mlkem_key: mlkem.MLKEM768PrivateKey | None
    public: PublicIdentity

    @property
    def key_id(self) -> str:
        return self.public.key_id

    @property
    def recipient_id(self) -> str:
        return self.public.recipient_id

    def watermark_secret(self) -> bytes:
        """A secret for keying watermark patterns, derived from (never equal to) the signing key, so
        the owner needs no further file and publishing a pattern seed reveals nothing about signing."""
        raw = self.signing_key.private_bytes_raw()
        return hashlib.sha256(b"memfed watermark secret v1\0" + raw).digest()


def _encryption(passphrase: bytes | None) -> serialization.KeySerializationEncryption:
    # BestAvailableEncryption: the strongest PKCS#8 encryption this cryptography build offers
    # (currently PBES2 with scrypt-or-PBKDF2 + AES-256-CBC); a plain key file otherwise.
    return serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()


def _write_private(path: Path, data: bytes) -> None:
    """Write a key file atomically with mode 0600 (created 0600, never wider)."""
    write_bytes_atomic(path, data, mode=0o600)


def init_identity(
    directory: Path,
    *,
    passphrase: bytes | None = None,
    post_quantum: bool = False,
    force: bool = False,
    name: str = "",
) -> Identity:
    """Create a new identity in ``directory``. Refuses to overwrite existing key files unless ``force``."""
    directory = Path(directory)
    existing = [n for n in (*_PRIVATE_FILES, PUBLIC_FILE) if (directory / n).exists()]
    if existing and not force:
        raise AlreadyExistsError(
            f"an identity exists already in {directory} ({', '.join(existing)})",
            hint="use --force to replace it (peers holding the old public identity can no longer seal for "
            "you, and cubes you signed need the old key to verify)",
        )
    signing = ed25519.Ed25519PrivateKey.generate()
    xkey = x25519.X25519PrivateKey.generate()
    mkey = mlkem.MLKEM768PrivateKey.generate() if post_quantum else None
    suite = KemSuiteName.MLKEM768_X25519 if post_quantum else KemSuiteName.X25519
    public = PublicIdentity(
        signing.public_key(),
        suite,
        xkey.public_key(),
        mkey.public_key() if mkey else None,
        name=name or directory.resolve().parent.name,
    )
    enc = _encryption(passphrase)
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_private(directory / SIGNING_FILE, signing.private_bytes(pem, pkcs8, enc))
        _write_private(directory / X25519_FILE, xkey.private_bytes(pem, pkcs8, enc))
        if mkey is not None:
            _write_private(directory / MLKEM_FILE, mkey.private_bytes(pem, pkcs8, enc))
        elif (directory / MLKEM_FILE).exists():
            os.unlink(directory / MLKEM_FILE)  # --force from a PQ identity to a classic one
        write_bytes_atomic(directory / PUBLIC_FILE, public.to_json().encode(), mode=0o644)
    except OSError as exc:
        raise StorageError(f"cannot write identity files in {directory}: {exc.strerror}") from exc
    return Identity(directory, signing, xkey, mkey, public)


def _load_private(path: Path, passphrase: bytes | None) -> Any:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(
            f"no key file {path}", hint="create an identity with `memfed identity init`"
        ) from None
    except OSError as exc:
        raise StorageError(f"cannot read key file {path}: {exc.strerror}") from exc
    try:
        return serialization.load_pem_private_key(data, password=passphrase or None)
    except TypeError as exc:  # encrypted but no passphrase, or a passphrase for a plain key
        raise AuthenticationError(
            f"key file {path}: {exc}", hint="pass the passphrase with --passphrase-env VAR"
        ) from exc
    except ValueError as exc:  # wrong passphrase or a damaged file: the library cannot tell which
        raise AuthenticationError(
            f"cannot decrypt key file {path} (wrong passphrase or damaged file)"
        ) from exc
    except UnsupportedAlgorithm as exc:
        raise InvalidArgumentError(f"key file {path} holds an unsupported key: {exc}") from exc


def load_identity(directory: Path, *, passphrase: bytes | None = None) -> Identity:
    """Load a private identity, checking every key against the public identity file."""
    directory = Path(directory)
    public = load_public_identity(directory / PUBLIC_FILE)
    signing = _load_private(directory / SIGNING_FILE, passphrase)
    xkey = _load_private(directory / X25519_FILE, passphrase)
    mkey = None
    if public.suite is KemSuiteName.MLKEM768_X25519:
        mkey = _load_private(directory / MLKEM_FILE, passphrase)
    ok = (
        isinstance(signing, ed25519.Ed25519PrivateKey)
        and isinstance(xkey, x25519.X25519PrivateKey)
        and signing.public_key() == public.signing_key
        and xkey.public_key() == public.x25519_key
        and (mkey is None or mkey.public_key().public_bytes_raw() == public.mlkem_key.public_bytes_raw())  # type: ignore[union-attr]
    )
    if not ok:
        raise InvalidArgumentError(
            f"the key files in {directory} do not match {PUBLIC_FILE}",
            hint="the directory mixes two identities; restore it or create a new one with --force",
        )
    return Identity(directory, signing, xkey, mkey, public)
