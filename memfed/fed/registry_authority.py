"""Admission and publishing through the registry (``memfed.registry.Registry``): what a deployment uses.

The ServerApp runs next to the registry and acts as one registered node of the network, the
*aggregator*: it holds the shared cube's payloads in its own CubeStore and signs each new version's
manifest with its node identity. The registry then decides everything else:

- admission: a node takes part only if the registry's access control allows ``use`` on the shared cube
  to ``node:<principal>`` (a direct grant, a group grant, or ``admin``); every decision is audited there,
  and a revoke takes effect at the next round, since every round asks again;
- identity: the key a node signs its updates with must be the Ed25519 key it registered
  (``Registry.node``), so a node proves the principal the grant names;
- publishing: each round's result is stored locally and recorded in the registry's catalog as the next
  version (``Registry.publish``: signed manifest, version chain extended, rollback refused), held by the
  aggregator, from which nodes fetch it when they sync.

The aggregator must hold ``admin`` on the shared cube (the first publisher of a cube gets it; ``memfed
fed init --registry-dir`` publishes 1.0.0 that way).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from memfed.errors import IntegrityError, NotFoundError

if TYPE_CHECKING:
    from memfed.crypto.identity import Identity
    from memfed.cube.core import MemCube
    from memfed.cube.manifest import CubeManifest
    from memfed.registry.core import Registry

NODE_PREFIX = "node:"


class RegistryAuthority:
    """``Authorizer`` and ``Publisher`` backed by the registry, with the aggregator's local store."""

    def __init__(self, registry: Registry, store_root: str | Path, identity: Identity, node_id: str) -> None:
        self.registry = registry
        self.store_root = Path(store_root)
        self.identity = identity
        self.node_id = node_id

    @classmethod
    def open(
        cls,
        registry_dir: str | Path,
        store_root: str | Path,
        identity_dir: str | Path,
        *,
        node_id: str = "",
        db_url: str | None = None,
    ) -> RegistryAuthority:
        """Open the registry in ``registry_dir`` (its SQLite file, or the database at ``db_url``) and the
        aggregator's identity; ``node_id`` defaults to the identity's name."""
        from memfed.crypto.identity import load_identity

        ident = load_identity(Path(identity_dir))
        return cls(open_registry(registry_dir, db_url), store_root, ident, node_id or ident.public.name)

    def close(self) -> None:
        """Release the registry's database connections."""
        self.registry.close()

    # -- Authorizer ---------------------------------------------------------------------------------

    def is_allowed(self, principal: str, cube_id: str, action: str) -> bool:
        """The registry's decision for ``node:<principal>`` (audited there, allow and deny alike)."""
        return self.registry.is_allowed(_as_node(principal), cube_id, action)

    def signing_key(self, principal: str) -> bytes | None:
        """The Ed25519 key ``principal`` registered as a node, or None (users and groups sign nothing)."""
        node_id = _as_node(principal).removeprefix(NODE_PREFIX)
        if ":" in node_id:
            return None
        ident = self.registry.node(node_id)
        return bytes(ident.signing_public_key) if ident is not None else None

    # -- Publisher ----------------------------------------------------------------------------------

    def current(self, cube_id: str) -> MemCube:
        """The catalog's newest version of ``cube_id``, read from the aggregator's store.

        NotFoundError when the catalog has no such cube or the aggregator does not hold its newest
        version (sync it first); IntegrityError when the local copy is not what the catalog names.
        """
        from memfed.node.store import CubeStore

        manifest, _holders = self.registry.newest(cube_id)
        with CubeStore(self.store_root) as store:
            if not store.has(cube_id, manifest.version):
                raise NotFoundError(
                    f"the aggregator does not hold {cube_id}@{manifest.version}, the catalog's newest",
                    hint="sync it into the aggregator's store before serving rounds on it",
                )
            cube = store.get(cube_id, manifest.version)
        if cube.manifest.digest != manifest.digest:
            raise IntegrityError(
                f"the local {cube_id}@{manifest.version} has digest {cube.manifest.digest}, "
                f"the catalog names {manifest.digest}"
            )
        return cube

    def publish(self, cube: MemCube) -> CubeManifest:
        """Store ``cube`` locally, then record it in the catalog, signed by the aggregator and held by it.

        The local copy comes first: a catalog entry must never name a version its holder cannot serve.
        The registry refuses (and audits) a publisher without ``admin``, a rollback or a broken chain.
        """
        from memfed.crypto.signing import sign_manifest
        from memfed.node.store import CubeStore

        with CubeStore(self.store_root) as store:
            stored = store.put(cube.manifest, cube.payload)
        signed = sign_manifest(cube.manifest, self.identity)
        self.registry.publish(signed, self.node_id, publisher=NODE_PREFIX + self.node_id)
        return stored


def _as_node(principal: str) -> str:
    """A bare principal name (what a node's proof carries) is the node of that id, as in the registry."""
    return principal if ":" in principal else NODE_PREFIX + principal


def open_registry(registry_dir: str | Path, db_url: str | None = None) -> Registry:
    """``Registry.open`` (imported here so LocalAuthority-only deployments never load SQLAlchemy)."""
    from memfed.registry.core import Registry

    return Registry.open(registry_dir, db_url=db_url)
