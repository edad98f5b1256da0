"""Versions of an edit cube in a store: each new edit is the next version, naming its parent.

A cube id is one lineage of edits (a codebook that grows, or a set of low-rank fixes). Applying an edit
makes version N+1 from the *current* version N (the newest neither archived nor expired), with N's digest
appended to the version chain; rolling back (``Lifecycle.rollback``) makes an earlier version current
again, and since every version holds the complete set of its edits, attaching the current version
restores exactly the answers that version gave.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from memfed.cube.core import MemCube
from memfed.cube.manifest import parse_semver, semver_key
from memfed.errors import NotFoundError
from memfed.node.editing.cubes import AttachedEdit, attach
from memfed.node.store import CubeStore


@dataclass(frozen=True)
class NextVersion:
    """Where the next edit of ``cube_id`` goes: its version, its parent (None for a new cube), its chain."""

    cube_id: str
    version: str
    parent: MemCube | None
    chain: tuple[str, ...]


def next_version(store: CubeStore, cube_id: str) -> NextVersion:
    """Version N+1 (minor bump over the newest stored version) on top of the current version."""
    versions = store.versions(cube_id)
    if not versions:
        return NextVersion(cube_id, "1.0.0", None, ())
    newest = max(versions, key=semver_key)
    major, minor, _, _ = parse_semver(newest)
    current = store.current_version(cube_id)
    parent = store.get(cube_id, current) if current is not None else None
    chain: tuple[str, ...] = ()
    if parent is not None:
        chain = (*parent.manifest.version_chain, parent.manifest.digest)
    return NextVersion(cube_id, f"{major}.{minor + 1}.0", parent, chain)


def current_cube(store: CubeStore, cube_id: str) -> MemCube:
    """The version of ``cube_id`` in use; NotFoundError when every version is archived or expired."""
    current = store.current_version(cube_id)  # NotFoundError when the store has no such cube
    if current is None:
        raise NotFoundError(
            f"every version of cube {cube_id!r} is archived or expired",
            hint=f"restore one (memfed module restore {cube_id}@VERSION)",
        )
    return store.get(cube_id, current)


def attach_current(model: torch.nn.Module, store: CubeStore, cube_ids: Iterable[str]) -> list[AttachedEdit]:
    """Attach the current version of each edit cube; on an error, what was attached is removed again."""
    attached: list[AttachedEdit] = []
    try:
        for cube_id in cube_ids:
            attached.append(attach(model, current_cube(store, cube_id)))
    except Exception:
        for a in reversed(attached):
            a.remove()
        raise
    return attached
