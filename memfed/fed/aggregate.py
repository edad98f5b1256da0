"""Aggregate LoRA updates into the next shared cube: exactly (stack, svd) or as FedIT does (baseline).

Every client trains a *fresh* LoRA on top of the current shared cube (merged into its weights), so its
update is a residual ΔW_i = B_i A_i and the next shared delta is ``current + Σ w_i ΔW_i`` with weights
w_i = n_i / Σ n_j (sample counts). The methods differ only in how that sum is written down:

- ``stack`` (FLoRA-style, the default): the factors are stacked, so the sum is exact; the rank grows by
  Σ r_i per round. ``stack_factors`` does it on the factors (the math of ``memfed.node.merge``'s ``cat``
  method, without a payload round trip per update).
- ``svd``: the same exact sum, re-factored to ``rank`` by truncated SVD (``merge``'s ``svd`` method); the
  relative truncation error is reported, so the loss is never silent.
- ``fedit``: averages the A's and the B's separately (FedIT), then stacks that onto the current cube.
  Inexact (cross terms B_i A_j), kept only as the baseline the bench compares against.

The aggregation error of a result is ‖ΔW_agg − Σ w_i ΔW_i‖_F / ‖Σ w_i ΔW_i‖_F over all modules, with
ΔW_agg = next − current: what ``aggregation_error`` computes, from the factors, without any out×in matrix
being formed for more than one module at a time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from memfed.cube.build import lora_cube
from memfed.cube.core import MemCube
from memfed.errors import InvalidArgumentError
from memfed.mip.v1 import cube_pb2
from memfed.node.merge import merge_lora_cubes

METHODS: tuple[str, ...] = ("stack", "svd", "fedit")
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Aggregate:
    """The next shared delta as factors (scaling folded in: alpha = rank), and what it cost."""

    factors: Factors
    method: str
    weights: list[float]
    truncation_error: float = 0.0
    params: dict[str, str] = field(default_factory=dict)


def sample_weights(counts: Sequence[int]) -> list[float]:
    """w_i = n_i / Σ n_j: the weighting FedAvg uses, so a node with more data counts more."""
    if not counts or any(int(n) < 1 for n in counts):
        raise InvalidArgumentError(f"every update needs a sample count >= 1, got {list(counts)}")
    total = float(sum(counts))
    return [int(n) / total for n in counts]


def cube_factors(cube: MemCube) -> Factors:
    """{module: (A, B)} of a LoRA cube with its scaling folded into B, so B A is the module's delta."""
    tensors = cube.tensors()
    out: Factors = {}
    for target in cube.manifest.payload.lora.targets:
        a = tensors[f"{target.module}.lora_A.weight"].double()
        b = tensors[f"{target.module}.lora_B.weight"].double() * float(target.scaling)
        out[target.module] = (a, b)
    return out


def _as_cube(base: cube_pb2.BaseModelFingerprint, factors: Factors, name: str) -> MemCube:
    return lora_cube(base, {m: (a.float(), b.float()) for m, (a, b) in factors.items()}, cube_id=name)


def aggregate(
    current: MemCube,
    updates: Sequence[Factors],
    counts: Sequence[int],
    *,
    method: str = "stack",
    rank: int | None = None,
) -> Aggregate:
    """The next shared delta from the current cube and the accepted updates (each {module: (A, B)}).

    ``rank`` applies to ``svd`` (default: the current cube's rank). Raises InvalidArgumentError for an
    unknown method, no updates, or counts that do not pair with the updates.
    """
    if method not in METHODS:
        raise InvalidArgumentError(f"unknown aggregation {method!r}", hint=f"use one of {METHODS}")
    if not updates or len(updates) != len(counts):
        raise InvalidArgumentError(f"{len(updates)} updates with {len(counts)} sample counts")
    weights = sample_weights(counts)
    base = current.manifest.base_model
    if method == "fedit":
        return Aggregate(stack_factors([cube_factors(current), _fedit(updates, weights)]), method, weights)
    if method == "stack":
        return Aggregate(stack_factors([cube_factors(current), *updates], [1.0, *weights]), method, weights)
    cubes = [current, *(_as_cube(base, u, f"update-{i}") for i, u in enumerate(updates))]
    r = rank or int(current.manifest.payload.lora.rank)
    out = merge_lora_cubes(cubes, [1.0, *weights], method="svd", rank=r, cube_id="aggregate")
    error = float(out.manifest.origin.params["truncation_error"])
    return Aggregate(cube_factors(out), method, weights, truncation_error=error, params={"rank": str(r)})


def stack_factors(parts: Sequence[Factors], weights: Sequence[float] | None = None) -> Factors:
    """Σ_i w_i B_i A_i written exactly as one LoRA: A = [A_1; A_2; ...], B = [w_1 B_1, w_2 B_2, ...].

    The same math as ``merge_lora_cubes(method="cat")`` (which the ``svd`` path and node-side merges
    use), done on the factors directly in float64: going through cubes cost a payload encode and decode
    per update, most of the server's aggregation time.
    """
    ws = list(weights) if weights is not None else [1.0] * len(parts)
    out: Factors = {}
    for module in parts[0]:
        present = [(p[module], w) for p, w in zip(parts, ws, strict=True) if module in p]
        a = torch.cat([ab[0].double() for ab, _ in present], dim=0)
        b = torch.cat([ab[1].double() * w for ab, w in present], dim=1)
        out[module] = (a, b)
    return out


def _fedit(updates: Sequence[Factors], weights: Sequence[float]) -> Factors:
    """FedIT: Σ w_i A_i and Σ w_i B_i, separately (needs equal ranks, as FedIT's shared init gives)."""
    out: Factors = {}
    for module in updates[0]:
        ranks = {int(u[module][0].shape[0]) for u in updates}
        if len(ranks) != 1:
            raise InvalidArgumentError(f"FedIT needs equal ranks; module {module!r} has {sorted(ranks)}")
        a = sum(w * u[module][0].double() for u, w in zip(updates, weights, strict=True))
        b = sum(w * u[module][1].double() for u, w in zip(updates, weights, strict=True))
        out[module] = (a, b)  # type: ignore[assignment]
    return out


def delta(factors: Factors, module: str) -> torch.Tensor:
    """ΔW = B A of one module, in float64."""
    a, b = factors[module]
    return b.double() @ a.double()


def aggregation_error(
    current: Factors, result: Factors, updates: Sequence[Factors], weights: Sequence[float]
) -> float:
    """‖(result − current) − Σ w_i ΔW_i‖_F / ‖Σ w_i ΔW_i‖_F over all modules (0 for an exact method)."""
    num = den = 0.0
    for module in result:
        target = sum(w * delta(u, module) for u, w in zip(updates, weights, strict=True) if module in u)
        got = delta(result, module) - (delta(current, module) if module in current else 0.0)
        num += float(((got - target) ** 2).sum())
        den += float((torch.as_tensor(target) ** 2).sum())
    return math.sqrt(num / den) if den > 0 else 0.0
