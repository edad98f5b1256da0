"""Create version 1.0.0 of a shared cube: a zero LoRA on the chosen layers, for rounds to build on.

A zero delta (B = 0, A = 0) changes nothing until the first round publishes, and fixes what every later
version must match: the base model (fingerprint) and the adapted modules.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from memfed.cube.build import lora_cube
from memfed.cube.core import MemCube
from memfed.errors import InvalidArgumentError
from memfed.mip.v1 import cube_pb2


def target_modules(model: torch.nn.Module, names: Sequence[str]) -> list[str]:
    """Full paths of the linear layers whose last name part is in ``names`` (e.g. q_proj, v_proj)."""
    out = []
    for path, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if path.rsplit(".", 1)[-1] in names and isinstance(weight, torch.Tensor) and weight.dim() == 2:
            out.append(path)
    if not out:
        raise InvalidArgumentError(f"the model has no 2-D layer named {list(names)}")
    return out


def new_shared_cube(
    model: torch.nn.Module, cube_id: str, names: Sequence[str] = ("q_proj", "v_proj"), *, owner: str = ""
) -> MemCube:
    """The zero rank-1 LoRA cube ``cube_id@1.0.0`` on the ``names`` layers of ``model``."""
    conv1d = any(type(m).__name__ == "Conv1D" for m in model.modules())
    factors = {}
    for path in target_modules(model, names):
        w = model.get_submodule(path).weight
        out_dim, in_dim = (w.shape[1], w.shape[0]) if conv1d else (w.shape[0], w.shape[1])
        factors[path] = (torch.zeros(1, in_dim), torch.zeros(out_dim, 1))
    origin = cube_pb2.Origin(method="federated", description=f"shared cube {cube_id}: empty start, round 0")
    return lora_cube(model, factors, cube_id=cube_id, origin=origin, owner=owner, tags=["shared"])
