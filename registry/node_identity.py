"""The ``NodeIdentity`` a node registers: its x509 certificate plus the public keys of its memfed
identity (Ed25519 for signatures, HPKE for sealed cubes). Kept apart so nodes and the CLI build it the
same way."""

from __future__ import annotations

from memfed.crypto.identity import PublicIdentity
from memfed.errors import InvalidArgumentError
from memfed.mip.v1 import registry_service_pb2 as rpb
from memfed.registry.pki import cert_common_name


def identity_message(
    public: PublicIdentity, cert_pem: bytes | None, node_id: str | None = None, address: str = ""
) -> rpb.NodeIdentity:
    if cert_pem is None:
        raise InvalidArgumentError("registering a node needs its certificate", hint="pass --tls DIR")
    return rpb.NodeIdentity(
        node_id=node_id or cert_common_name(cert_pem),
        certificate_pem=cert_pem,
        signing_public_key=public.signing_key.public_bytes_raw(),
        kem_public_key=public.x25519_key.public_bytes_raw(),
        kem_suite=public.suite.value,
        fingerprint=public.fingerprint,
        address=address,
    )
