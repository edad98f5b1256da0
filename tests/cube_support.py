"""Test helpers for cubes whose payload a test rewrote (to check that readers refuse it)."""

from __future__ import annotations

import torch

from memfed.cube.core import MemCube
from memfed.cube.digest import payload_digest
from memfed.cube.manifest import CubeManifest
from memfed.cube.payload import encode_tensors


def rebuilt_cube(cube: MemCube, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> MemCube:
    """``cube`` with ``tensors`` and header ``meta`` as its payload, the digest updated to match: a
    well-formed cube, so the reader under test has to catch what is wrong inside."""
    payload = encode_tensors(tensors, metadata=meta)
    m = CubeManifest()
    m.CopyFrom(cube.manifest)
    m.digest = payload_digest(payload)
    return MemCube(m, payload)
