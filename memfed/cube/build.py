"""Build LoRA and bottleneck-adapter cubes from tensors (training, merging, conversion all end here).

One place that turns "factors for these layers of this model" into a validated cube, so every producer
writes the same tensor names and manifest fields the runtime and PEFT export expect.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from memfed.cube.core import MemCube
from memfed.cube.digest import payload_digest
from memfed.cube.fingerprint import fingerprint_model
from memfed.cube.manifest import new_manifest
from memfed.cube.payload import describe_tensors, dominant_dtype, encode_tensors
from memfed.errors import InvalidArgumentError
from memfed.mip.v1 import cube_pb2

ADAPTER_PARTS = ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")

if TYPE_CHECKING:
    import torch


def lora_cube(
    model: torch.nn.Module | cube_pb2.BaseModelFingerprint,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    cube_id: str,
    version: str = "1.0.0",
    alpha: float | dict[str, float] | None = None,
    origin: cube_pb2.Origin | None = None,
    lifecycle: str = "generated",
    version_chain: Iterable[str] = (),
    owner: str = "",
    tags: Iterable[str] = (),
    priority: str | int = "normal",
    ttl_seconds: int = 0,
) -> MemCube:
    """A LoRA cube from ``{module path: (A (r, in), B (out, r))}``.

    ``alpha`` defaults to the rank (scaling 1), the natural choice when B already carries the scale.
    ``model`` may be the host model or an already computed fingerprint of it.
    """
    if not factors:
        raise InvalidArgumentError("a LoRA cube needs at least one (A, B) pair")
    tensors: dict[str, torch.Tensor] = {}
    targets = []
    for module in sorted(factors):
        a, b = factors[module]
        rank = int(a.shape[0])
        if a.dim() != 2 or b.dim() != 2 or int(b.shape[1]) != rank:
            raise InvalidArgumentError(
                f"module {module}: A {tuple(a.shape)} and B {tuple(b.shape)} do not pair"
            )
        a_alpha = float(alpha.get(module, rank) if isinstance(alpha, dict) else (alpha or rank))
        targets.append(cube_pb2.LoraTarget(module=module, rank=rank, alpha=a_alpha, scaling=a_alpha / rank))
        tensors[f"{module}.lora_A.weight"] = a
        tensors[f"{module}.lora_B.weight"] = b
    ranks = sorted({t.rank for t in targets})
    spec = cube_pb2.LoraSpec(
        rank=ranks[-1],
        alpha=targets[0].alpha if len({t.alpha for t in targets}) == 1 else float(ranks[-1]),
        target_modules=sorted({t.module.rsplit(".", 1)[-1] for t in targets}),
        targets=targets,
    )
    description = cube_pb2.PayloadDescription(lora=spec)
    return tensor_cube(model, tensors, "lora", description, cube_id=cube_id, version=version,
                       origin=origin, lifecycle=lifecycle, version_chain=version_chain, owner=owner,
                       tags=tags, priority=priority, ttl_seconds=ttl_seconds)  # fmt: skip


def adapter_cube(
    model: torch.nn.Module | cube_pb2.BaseModelFingerprint,
    weights: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
    *,
    cube_id: str,
    activation: str = "relu",
    version: str = "1.0.0",
    origin: cube_pb2.Origin | None = None,
    lifecycle: str = "generated",
    owner: str = "",
    tags: Iterable[str] = (),
    priority: str | int = "normal",
    ttl_seconds: int = 0,
) -> MemCube:
    """A bottleneck-adapter cube from ``{module path: (down_w (d, out), down_b (d,), up_w (out, d), up_b)}``.

    The adapter acts on the named layer's output h as ``h + up(act(down(h)))``.
    """
    if not weights:
        raise InvalidArgumentError("an adapter cube needs at least one target layer")
    tensors: dict[str, torch.Tensor] = {}
    dims = set()
    for module in sorted(weights):
        dw, db, uw, ub = weights[module]
        dims.add(int(dw.shape[0]))
        for part, t in zip(ADAPTER_PARTS, (dw, db, uw, ub), strict=True):
            tensors[f"{module}.{part}"] = t
    if len(dims) != 1:
        raise InvalidArgumentError(f"all adapter layers need one bottleneck size, got {sorted(dims)}")
    spec = cube_pb2.AdapterSpec(
        bottleneck_dim=dims.pop(),
        target_modules=sorted({m.rsplit(".", 1)[-1] for m in weights}),
        activation=activation,
    )
    description = cube_pb2.PayloadDescription(adapter=spec)
    return tensor_cube(model, tensors, "adapter", description, cube_id=cube_id, version=version,
                       origin=origin, lifecycle=lifecycle, version_chain=(), owner=owner, tags=tags,
                       priority=priority, ttl_seconds=ttl_seconds)  # fmt: skip


def tensor_cube(
    model: torch.nn.Module | cube_pb2.BaseModelFingerprint,
    tensors: dict[str, torch.Tensor],
    kind: str,
    description: cube_pb2.PayloadDescription | None = None,
    *,
    cube_id: str,
    version: str = "1.0.0",
    origin: cube_pb2.Origin | None = None,
    lifecycle: str = "generated",
    version_chain: Iterable[str] = (),
    owner: str = "",
    tags: Iterable[str] = (),
    priority: str | int = "normal",
    ttl_seconds: int = 0,
    metadata: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> MemCube:
    """A cube of any kind from named tensors: the one place a payload is encoded and its manifest made.

    ``description`` carries the kind's spec (LoRA, adapter) when it has one; the tensor list and dtype are
    filled in here. ``metadata`` goes into the safetensors header (so the digest covers it: settings the
    payload cannot be read without), ``annotations`` into the manifest (what a reader checks first).
    """
    payload = encode_tensors(tensors, metadata=metadata)
    infos = describe_tensors(payload)
    description = description or cube_pb2.PayloadDescription()
    description.tensors.extend(infos)
    description.dtype = dominant_dtype(infos)
    fp = model if isinstance(model, cube_pb2.BaseModelFingerprint) else fingerprint_model(model)
    manifest = new_manifest(
        cube_id=cube_id,
        version=version,
        kind=kind,
        digest=payload_digest(payload),
        size_bytes=len(payload),
        base_model=fp,
        payload=description,
        origin=origin or cube_pb2.Origin(method="manual"),
        owner=owner,
        version_chain=version_chain,
        tags=tags,
        priority=priority,
        ttl_seconds=ttl_seconds,
        lifecycle=lifecycle,
        annotations=annotations,
    )
    return MemCube(manifest=manifest, payload=payload)
