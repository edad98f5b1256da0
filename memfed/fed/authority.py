"""Who may take part in a round, and where its result goes: the two things the server asks a registry.

The strategy depends only on these two Protocols, so it runs against the real registry
(``memfed.registry``) or, where none is deployed, against ``LocalAuthority``: a deny-by-default grants
file plus a local CubeStore. Neither side imports torch.

Grants file (JSON)::

    {"principals": {"alice": "<Ed25519 public key, hex>", ...},
     "grants": {"medical_advisor": {"use": ["alice", "bob"]}}}

A principal without a registered key is never admitted: a node proves its name by signing with that key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from memfed.cube.manifest import parse_semver
from memfed.errors import InvalidArgumentError, NotFoundError

if TYPE_CHECKING:
    from memfed.cube.core import MemCube
    from memfed.cube.manifest import CubeManifest

USE = "use"


class Authorizer(Protocol):
    """The registry's access control, as federation needs it."""

    def is_allowed(self, principal: str, cube_id: str, action: str) -> bool:
        """Whether ``principal`` holds ``action`` on ``cube_id`` (deny by default)."""
        ...

    def signing_key(self, principal: str) -> bytes | None:
        """The raw Ed25519 public key registered for ``principal``, or None if it is unknown."""
        ...


class Publisher(Protocol):
    """Where the shared cube's versions live."""

    def current(self, cube_id: str) -> MemCube:
        """The latest version of the shared cube (NotFoundError if there is none)."""
        ...

    def publish(self, cube: MemCube) -> CubeManifest:
        """Record ``cube`` as the next version of its cube id."""
        ...


class Authority(Authorizer, Publisher, Protocol):
    """Both roles in one object: what ``LocalAuthority`` and ``RegistryAuthority`` are."""

    def close(self) -> None:
        """Release what the authority holds open (the registry's database connections)."""
        ...


def next_version(version: str) -> str:
    """The next minor version (1.2.0 -> 1.3.0): a federated round adds to a module, it does not break it."""
    major, minor, _patch, _pre = parse_semver(version)
    return f"{major}.{minor + 1}.0"


class LocalAuthority:
    """A grants file and a local CubeStore: ``Authorizer`` and ``Publisher`` without a registry service."""

    def __init__(self, store_root: str | Path, grants_path: str | Path) -> None:
        self.store_root = Path(store_root)
        self.grants_path = Path(grants_path)

    def _grants(self) -> dict:
        """Read on every decision, so a revoked grant takes effect in the next round."""
        try:
            data = json.loads(self.grants_path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise NotFoundError(f"grants file {str(self.grants_path)!r} does not exist") from exc
        except json.JSONDecodeError as exc:
            raise InvalidArgumentError(f"grants file {str(self.grants_path)!r} is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise InvalidArgumentError(f"grants file {str(self.grants_path)!r} must hold a JSON object")
        return data

    def is_allowed(self, principal: str, cube_id: str, action: str) -> bool:
        allowed = self._grants().get("grants", {}).get(cube_id, {}).get(action, [])
        return isinstance(allowed, list) and principal in allowed

    def signing_key(self, principal: str) -> bytes | None:
        key = self._grants().get("principals", {}).get(principal)
        try:
            return bytes.fromhex(key) if isinstance(key, str) else None
        except ValueError:
            return None

    def current(self, cube_id: str) -> MemCube:
        from memfed.node.store import CubeStore

        with CubeStore(self.store_root) as store:
            return store.get(cube_id)

    def publish(self, cube: MemCube) -> CubeManifest:
        from memfed.node.store import CubeStore

        with CubeStore(self.store_root) as store:
            return store.put(cube.manifest, cube.payload)

    def close(self) -> None:
        """Nothing held open (each call opens the store): here so both authorities close alike."""


def write_grants(
    path: str | Path, principals: dict[str, bytes], grants: dict[str, dict[str, list[str]]]
) -> Path:
    """Write a grants file (keys as raw Ed25519 public bytes); used by ``memfed fed grant`` and tests."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    data = {"principals": {k: v.hex() for k, v in principals.items()}, "grants": grants}
    p.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
    return p
