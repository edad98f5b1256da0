"""A small federation on disk for the fed tests: tiny model, node identities, local data, grants, store."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CUBE_ID = "medical_advisor"
GRANTED = ("alice", "bob", "carol")
TEXTS = {
    "alice": "Ada Lindqvist works as a nurse. Ada Lindqvist lives in Uppsala. The clinic opens at nine.",
    "bob": "Bruno Keller works as a surgeon. Bruno Keller lives in Basel. The ward has twelve beds. "
    "Night shifts start at ten.",
    "carol": "Chiara Rossi works as a pharmacist. Chiara Rossi lives in Turin.",
    "mallory": "Mallory Stone works as a spy.",
}


@dataclass
class Federation:
    root: Path
    model_dir: Path
    store: Path
    grants: Path
    nodes: dict[str, tuple[Path, Path]]  # principal -> (identity dir, data file)


def federation_paths(root: Path) -> tuple[Path, dict[str, tuple[Path, Path]]]:
    """(model dir, {principal: (identity dir, data file)}) that ``make_federation(root)`` will create:
    known before it runs, so SuperNodes can start while it does."""
    return root / "model", {name: (root / name / "identity", root / name / "data.txt") for name in TEXTS}


def make_federation(root: Path, *, granted: tuple[str, ...] = GRANTED, seed: int = 0) -> Federation:
    """Identities for every name in TEXTS, grants for ``granted`` only, and ``CUBE_ID@1.0.0`` in the store."""
    from memfed.crypto.identity import init_identity
    from memfed.fed.authority import LocalAuthority, write_grants
    from memfed.fed.shared import new_shared_cube
    from memfed.node.models import load_host_model
    from memfed.node.tiny_models import save_tiny_model_dir

    model_path, nodes = federation_paths(root)
    model_dir = save_tiny_model_dir("llama", model_path, seed=seed)
    keys = {}
    for name, text in TEXTS.items():
        identity, data = nodes[name]
        ident = init_identity(identity, name=name)
        data.write_text(text, encoding="utf-8")
        keys[name] = ident.signing_key.public_key().public_bytes_raw()
    grants = write_grants(root / "grants.json", keys, {CUBE_ID: {"use": list(granted)}})
    model, _ = load_host_model(model_dir, device="cpu")
    authority = LocalAuthority(root / "store", grants)
    authority.publish(new_shared_cube(model, CUBE_ID))
    return Federation(root, model_dir, root / "store", grants, nodes)


AGGREGATOR = "fed-aggregator"


def registry_federation(fed: Federation, root: Path, *, granted: tuple[str, ...] = GRANTED):
    """The federation's nodes registered in a real registry (SQLite), with the aggregator node that
    publishes ``CUBE_ID@1.0.0`` (so it holds ``admin``) and ``use`` granted to ``granted`` only.

    Returns the ``RegistryAuthority`` the ServerApp would use.
    """
    from memfed.crypto.identity import init_identity, load_identity
    from memfed.fed.registry_authority import RegistryAuthority
    from memfed.fed.shared import new_shared_cube
    from memfed.mip.v1 import registry_service_pb2 as rpb
    from memfed.node.models import load_host_model
    from memfed.registry import pki
    from memfed.registry.core import Registry

    ca = root / "ca"
    if not (ca / "ca.key").exists():  # the network CA the SuperLink's certificate may come from too
        pki.init_ca(ca)
    registry = Registry.open(root / "registry")
    identities = {name: load_identity(identity) for name, (identity, _data) in fed.nodes.items()}
    identities[AGGREGATOR] = init_identity(root / AGGREGATOR / "identity", name=AGGREGATOR)
    for name, ident in identities.items():
        pub = ident.public
        registry.register_node(
            rpb.NodeIdentity(
                node_id=name,
                certificate_pem=pki.issue(ca, name).cert.read_bytes(),
                signing_public_key=pub.signing_key.public_bytes_raw(),
                kem_public_key=pub.x25519_key.public_bytes_raw(),
                kem_suite=pub.suite.value,
                fingerprint=pub.fingerprint,
            )
        )
    authority = RegistryAuthority(registry, root / "aggregator-store", identities[AGGREGATOR], AGGREGATOR)
    model, _ = load_host_model(fed.model_dir, device="cpu")
    authority.publish(new_shared_cube(model, CUBE_ID))
    for name in granted:
        registry.grant(CUBE_ID, f"node:{name}", ["use"], by=f"node:{AGGREGATOR}")
    return authority
