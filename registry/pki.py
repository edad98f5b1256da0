"""The network's PKI: one CA, and an x509 certificate per node or registry, for mutual TLS.

Layout of a PKI directory::

    ca.pem / ca.key              the network CA (the key stays with whoever admits nodes)
    NAME/cert.pem / NAME/key.pem a node's or the registry's certificate and private key

Why a private CA and not the Ed25519 identity: gRPC's TLS (BoringSSL) wants x509 certificates, and a
CA lets every peer check every other with one trust anchor. The certificate's common name is the node
id, so the TLS layer itself names the caller; the registry then pins the exact certificate a node
registered with (see ``memfed.registry.tls.peer_of``), so a certificate issued for one node cannot
speak for another. Keys are ECDSA P-256 (fast handshakes, supported everywhere); private files are 0600.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from memfed.errors import (
    AlreadyExistsError,
    AuthenticationError,
    InvalidArgumentError,
    NotFoundError,
    StorageError,
)
from memfed.fsio import write_bytes_atomic

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
DEFAULT_HOSTS = ("127.0.0.1", "localhost", "::1")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


@dataclass(frozen=True)
class IssuedCert:
    """Paths of one issued certificate (what `--tls-cert/--tls-key/--tls-ca` take)."""

    name: str
    cert: Path
    key: Path
    ca: Path

    @property
    def fingerprint(self) -> str:
        return cert_fingerprint(self.cert.read_bytes())


def check_name(name: str) -> str:
    if not _NAME_RE.match(name or ""):
        raise InvalidArgumentError(
            f"certificate name {name!r} is not a valid node id",
            hint="use 1-64 letters, digits, '_', '.', '-', starting with a letter or digit",
        )
    return name


def cert_fingerprint(pem: bytes) -> str:
    """SHA-256 of the certificate's DER bytes, hex: what the registry pins per node."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise InvalidArgumentError(f"not a PEM x509 certificate: {exc}") from exc
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def cert_common_name(pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(pem)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def init_ca(
    directory: Path, *, name: str = "memfed network CA", days: int = 3650, force: bool = False
) -> Path:
    """Create the network CA in ``directory``; refuses to replace one unless ``force``."""
    directory = Path(directory)
    if (directory / CA_KEY).exists() and not force:
        raise AlreadyExistsError(
            f"a network CA exists already in {directory}",
            hint="use --force to replace it (every certificate it issued stops being trusted)",
        )
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_bytes_atomic(directory / CA_KEY, _key_pem(key), mode=0o600)
        write_bytes_atomic(directory / CA_CERT, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    except OSError as exc:
        raise StorageError(f"cannot write the CA in {directory}: {exc.strerror}") from exc
    return directory / CA_CERT


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), password=None)
    except FileNotFoundError:
        raise NotFoundError(
            f"no network CA in {directory}", hint="create one with `memfed pki init --dir DIR`"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InvalidArgumentError(f"{directory / CA_KEY} is not an EC private key")
    return cert, key


def _san(hosts: tuple[str, ...], name: str) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = [x509.DNSName(name)]
    for h in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            if h != name:
                entries.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(entries)


def issue(
    directory: Path,
    name: str,
    *,
    hosts: tuple[str, ...] = (),
    days: int = 825,
    force: bool = False,
    out_dir: Path | None = None,
) -> IssuedCert:
    """Issue a certificate for node (or registry) ``name``, signed by the CA in ``directory``.

    The common name and a DNS SAN are ``name`` (the identity the peer is checked against); the SANs also
    cover 127.0.0.1, localhost and ``hosts`` so clients can verify the server by address. Usable for both
    server and client authentication, since every node is both.
    """
    check_name(name)
    directory = Path(directory)
    ca_cert, ca_key = _load_ca(directory)
    out = Path(out_dir) if out_dir else directory / name
    if (out / KEY_FILE).exists() and not force:
        raise AlreadyExistsError(
            f"a certificate for {name!r} exists already in {out}",
            hint="use --force to issue a new one (re-register the node with it afterwards)",
        )
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(tuple(dict.fromkeys((*DEFAULT_HOSTS, *hosts))), name), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    try:
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_bytes_atomic(out / KEY_FILE, _key_pem(key), mode=0o600)
        write_bytes_atomic(out / CERT_FILE, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
        write_bytes_atomic(out / CA_CERT, (directory / CA_CERT).read_bytes(), mode=0o644)
    except OSError as exc:
        raise StorageError(f"cannot write the certificate in {out}: {exc.strerror}") from exc
    return IssuedCert(name, out / CERT_FILE, out / KEY_FILE, out / CA_CERT)


def verify_issued_by(cert_pem: bytes, ca_pem: bytes) -> x509.Certificate:
    """Check that ``cert_pem`` was signed by the CA and is within its validity (registration time)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        ca = x509.load_pem_x509_certificate(ca_pem)
    except ValueError as exc:
        raise InvalidArgumentError(f"not a PEM x509 certificate: {exc}") from exc
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise AuthenticationError(
            "the certificate was not issued by this network's CA",
            hint="issue it with `memfed pki issue NAME` from the network CA",
        ) from exc
    now = _now()
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise AuthenticationError("the certificate is expired or not yet valid", hint="issue a new one")
    return cert
