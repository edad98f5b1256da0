"""Shared set-up for the registry, PKI and sync tests: real certificates, identities, signed manifests,
and the two database backends (SQLite file; PostgreSQL in a fresh schema, skipped when none answers)."""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from memfed.crypto.identity import Identity, init_identity
from memfed.crypto.signing import sign_manifest
from memfed.cube.manifest import new_manifest
from memfed.mip.v1 import cube_pb2
from memfed.mip.v1 import registry_service_pb2 as rpb
from memfed.registry import pki

PG_URL = os.environ.get("MEMFED_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@dataclass
class Party:
    """A node (or operator) with an identity and a certificate from the network CA."""

    name: str
    identity: Identity
    cert: pki.IssuedCert

    def message(self, address: str = "") -> rpb.NodeIdentity:
        pub = self.identity.public
        return rpb.NodeIdentity(
            node_id=self.name,
            certificate_pem=self.cert.cert.read_bytes(),
            signing_public_key=pub.signing_key.public_bytes_raw(),
            kem_public_key=pub.x25519_key.public_bytes_raw(),
            kem_suite=pub.suite.value,
            fingerprint=pub.fingerprint,
            address=address,
        )

    def manifest(
        self, cube_id: str, version: str, *, chain: tuple[str, ...] = (), payload: bytes | None = None
    ) -> cube_pb2.SignedManifest:
        data = payload if payload is not None else secrets.token_bytes(64)
        m = new_manifest(
            cube_id=cube_id,
            version=version,
            kind="plaintext",
            digest="sha256:" + hashlib.sha256(data).hexdigest(),
            size_bytes=len(data),
            owner=self.name,
            version_chain=chain,
        )
        return sign_manifest(m, self.identity)


def make_party(pki_dir: Path, name: str) -> Party:
    ident = init_identity(pki_dir / name / "identity", name=name)
    return Party(name, ident, pki.issue(pki_dir, name))


def pg_available() -> str | None:
    """None when PostgreSQL answers, else the one-line reason to skip."""
    try:
        import psycopg

        with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", connect_timeout=2):
            return None
    except Exception as exc:
        return f"no PostgreSQL at 127.0.0.1:5432 ({type(exc).__name__})"


def pg_schema_url() -> Iterator[str]:
    """A URL whose search_path is a fresh schema, dropped afterwards (tests stay isolated)."""
    import psycopg

    schema = "t_" + secrets.token_hex(6)
    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", autocommit=True) as c:
        c.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", autocommit=True) as c:
            c.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str | None]:
    """Each registry test runs on both backends: None = the SQLite default in the registry folder."""
    if request.param == "sqlite":
        yield None
        return
    reason = pg_available()
    if reason:
        pytest.skip(reason)
    yield from pg_schema_url()
