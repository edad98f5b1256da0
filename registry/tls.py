"""Mutual TLS for every memfed channel: credentials from PEM files, and who is on the other end.

Servers require a client certificate signed by the network CA (``require_client_auth=True``); clients
verify the server against the same CA. ``peer_of`` reads the verified peer certificate from a grpc.aio
call's auth context, so a handler knows *which node* is calling, not just that someone with a valid
certificate is: the registry pins each node's certificate fingerprint at registration and compares.
Plain text exists only behind an explicit ``--insecure`` and servers log it as a warning.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from memfed.errors import AuthenticationError, NotFoundError
from memfed.registry.pki import cert_common_name, cert_fingerprint


@dataclass(frozen=True)
class TlsFiles:
    """Where one party's certificate, key and the network CA live."""

    cert: Path
    key: Path
    ca: Path

    @classmethod
    def from_dir(cls, directory: Path) -> TlsFiles:
        """The files `memfed pki issue NAME` wrote into ``directory`` (cert.pem, key.pem, ca.pem)."""
        d = Path(directory)
        return cls(d / "cert.pem", d / "key.pem", d / "ca.pem")

    def _read(self) -> tuple[bytes, bytes, bytes]:
        try:
            return self.cert.read_bytes(), self.key.read_bytes(), self.ca.read_bytes()
        except FileNotFoundError as exc:
            raise NotFoundError(
                f"TLS file {exc.filename} does not exist",
                hint="issue one with `memfed pki issue NAME`, and pass --tls DIR (or --tls-cert/--tls-key/"
                "--tls-ca)",
            ) from None

    def server_credentials(self) -> grpc.ServerCredentials:
        """Server side of mutual TLS: clients must present a certificate the CA signed."""
        cert, key, ca = self._read()
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Client side of mutual TLS: present our certificate, trust only the network CA."""
        cert, key, ca = self._read()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

    @property
    def name(self) -> str:
        return cert_common_name(self._read()[0])


@dataclass(frozen=True)
class Peer:
    """The verified identity of the caller on a mutual-TLS channel."""

    name: str  # the certificate's common name: the node id it was issued for
    fingerprint: str  # SHA-256 of the certificate, hex
    cert_pem: bytes


def peer_of(context: Any) -> Peer | None:
    """The caller's verified certificate identity, or None on a plaintext (``--insecure``) channel."""
    auth = context.auth_context() or {}
    pems = auth.get("x509_pem_cert") or []
    if not pems:
        return None
    pem = pems[0]
    return Peer(cert_common_name(pem), cert_fingerprint(pem), pem)


def require_peer(context: Any) -> Peer:
    peer = peer_of(context)
    if peer is None:
        raise AuthenticationError(
            "this call needs a client certificate (mutual TLS)",
            hint="connect with --tls DIR holding the certificate `memfed pki issue` made for you",
        )
    return peer


def channel(address: str, tls: TlsFiles | None, options: Any = ()) -> grpc.Channel:
    """A sync channel: mutual TLS when ``tls`` is given, plaintext otherwise (callers pass insecure)."""
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, tls.channel_credentials(), options=options)


def aio_channel(address: str, tls: TlsFiles | None, options: Any = ()) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, tls.channel_credentials(), options=options)
