"""Merge LoRA cubes made for one base model into a single MERGED cube whose version chain names its parents.

The methods and their names are those of PEFT's ``LoraModel.add_weighted_adapter`` (``combination_type``),
and each reproduces PEFT 0.21's arithmetic, so a merge done here and one done in PEFT give the same weight
deltas (cat, svd) or even the same factors (linear, ties); DARE differs only in its random draws.
Per module, with cube i's factors A_i (r x in), B_i (out x r), scaling s_i and merge weight w_i, and
c_i = w_i * s_i:

- ``cat``: A = [c_1 A_1; c_2 A_2; ...], B = [B_1, B_2, ...]. Exact: B A = sum_i c_i B_i A_i, the weighted
  sum of the parents' weight deltas. Ranks add up.
- ``svd``: the same exact sum, truncated to ``rank`` singular directions (default: the largest parent
  rank). Lossy unless ``rank`` reaches the sum's rank; the relative Frobenius error is reported in the
  origin params (``truncation_error``). Computed from the small stacked factors by QR, never from a full
  out x in matrix, which gives the same SVD at a fraction of the cost.
- ``linear``: A = sum_i sign(c_i) sqrt|c_i| A_i, B = sum_i sqrt|c_i| B_i. Factors are combined
  *separately*, so B A also holds cross terms B_i A_j: it is NOT the weighted sum of deltas and only means
  something for adapters sharing a basis (trained from one initialisation). Needs equal ranks.
- ``ties``, ``dare_linear``, ``dare_ties``: like ``linear`` (same sqrt weights, on A and on B separately),
  with TIES (trim to the ``density`` largest magnitudes, elect a sign per entry, average the entries that
  agree with it) or DARE (drop entries at random, keep each with probability ``density``, rescale kept ones
  by 1/density). As in PEFT the sign is elected from the *unweighted* tensors, and the disjoint merge
  averages agreeing entries rather than summing them. DARE masks come from a generator seeded with
  (``seed``, module, factor, parent index), so a merge is reproducible and a module's mask does not depend
  on which other modules the cubes hold; PEFT draws from torch's global RNG instead.

The default is ``cat`` because it is the only exact method: a merged cube then behaves exactly as if all
its parents were applied together with their weights; ``svd`` is the way to trade that for a smaller rank.
Weights default to 1.0 each for the same reason (averaging would dilute every parent).

A module that only some parents adapt counts as a zero delta in the others, which is what PEFT does too
(it skips adapters absent from a layer; for every method here that equals adding zero).
The output folds all scaling into the factors and sets alpha = rank (scaling 1), so the cube computes
exactly B A on any runtime, whatever rsLoRA or alpha settings the parents used. (PEFT's merged adapter
also gets alpha = rank but keeps the first parent's ``use_rslora``, so PEFT scales a merge of rsLoRA
adapters by sqrt(rank); that is the one case where our result deliberately differs from PEFT's.)
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from memfed.cube.core import MemCube
from memfed.cube.digest import payload_digest
from memfed.cube.fingerprint import describe, mismatch_reasons
from memfed.cube.manifest import new_manifest, parse_ref
from memfed.cube.payload import describe_tensors, dominant_dtype, encode_tensors
from memfed.errors import IncompatibleModelError, InvalidArgumentError, UnsupportedError
from memfed.mip.v1 import cube_pb2

if TYPE_CHECKING:
    from memfed.node.store import CubeStore

MERGE_METHODS: tuple[str, ...] = ("cat", "svd", "linear", "ties", "dare_linear", "dare_ties")
_SIGN_METHODS = ("total", "frequency")
# (parent index, A (r, in), B (out, r), c = weight * scaling), computed in float64.
_Part = tuple[int, torch.Tensor, torch.Tensor, float]


def merge_lora_cubes(
    cubes: Sequence[MemCube],
    weights: Sequence[float] | None = None,
    *,
    method: str = "cat",
    cube_id: str,
    version: str = "1.0.0",
    density: float = 1.0,
    rank: int | None = None,
    majority_sign_method: str = "total",
    seed: int = 0,
    owner: str = "",
) -> MemCube:
    """Merge two or more LoRA cubes of one base model into a new cube with lifecycle ``merged``.

    ``weights`` (default 1.0 each) may be negative, to subtract a cube. ``density`` is for ties/dare only,
    ``rank`` for svd only (anything else with them is refused, so a setting never silently does nothing).
    Raises InvalidArgumentError for bad arguments, unequal ranks where a method needs equal ones, or
    non-finite weights; UnsupportedError for non-LoRA cubes; IncompatibleModelError for cubes made for
    different base models; IntegrityError if a payload does not match its digest.
    """
    weights = _check_arguments(cubes, weights, method, density, rank, majority_sign_method)
    _check_same_base_model(cubes)
    fan_in_fan_out = {c.manifest.payload.lora.fan_in_fan_out for c in cubes}
    if len(fan_in_fan_out) != 1:
        raise InvalidArgumentError("the cubes disagree on fan_in_fan_out (weight layout); they cannot merge")

    modules: dict[str, list[_Part]] = {}
    dtypes = []
    for i, (cube, w) in enumerate(zip(cubes, weights, strict=True)):
        for module, (a, b, scaling) in _read_lora(cube).items():
            dtypes.append(a.dtype)
            modules.setdefault(module, []).append((i, a.double(), b.double(), w * scaling))
    _check_shapes(modules, cubes)
    out_dtype = functools.reduce(torch.promote_types, dtypes)  # fp16 + bf16 parents give fp32

    svd_rank = rank or max(int(p[1].shape[0]) for parts in modules.values() for p in parts)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    dropped_sq = total_sq = worst = 0.0
    for module in sorted(modules):
        parts = modules[module]
        if method == "cat":
            a = torch.cat([c * a for _, a, _, c in parts], dim=0)
            b = torch.cat([b for _, _, b, _ in parts], dim=1)
        elif method == "svd":
            a, b, dropped, total = _svd_merge(parts, svd_rank)
            dropped_sq, total_sq = dropped_sq + dropped, total_sq + total
            worst = max(worst, math.sqrt(dropped / total) if total > 0 else 0.0)
        else:
            a, b = _factor_merge(module, parts, method, cubes, density, majority_sign_method, seed)
        factors[module] = (a.to(out_dtype).contiguous(), b.to(out_dtype).contiguous())

    params = {
        "method": method,
        "weights": json.dumps(weights),
        "rank": str(max(int(a.shape[0]) for a, _ in factors.values())),
        "parents": ",".join(c.manifest.digest for c in cubes),
    }
    if method in ("ties", "dare_linear", "dare_ties"):
        params["density"] = repr(density)
    if method.endswith("ties"):
        params["majority_sign_method"] = majority_sign_method
    if method.startswith("dare"):
        params["seed"] = str(seed)
    if method == "svd":
        params["truncation_error"] = f"{math.sqrt(dropped_sq / total_sq) if total_sq > 0 else 0.0:.6g}"
        params["max_module_truncation_error"] = f"{worst:.6g}"
    return _build_cube(cubes, factors, fan_in_fan_out.pop(), params, cube_id, version, owner)


def _check_arguments(
    cubes: Sequence[MemCube],
    weights: Sequence[float] | None,
    method: str,
    density: float,
    rank: int | None,
    majority_sign_method: str,
) -> list[float]:
    """Validate everything that does not need the payloads; return the weights as floats."""
    if len(cubes) < 2:
        raise InvalidArgumentError(f"a merge needs at least 2 cubes, got {len(cubes)}")
    if method not in MERGE_METHODS:
        raise InvalidArgumentError(f"unknown merge method {method!r}", hint=f"use one of {MERGE_METHODS}")
    weights = [1.0] * len(cubes) if weights is None else [float(w) for w in weights]
    if len(weights) != len(cubes):
        raise InvalidArgumentError(f"{len(weights)} weights for {len(cubes)} cubes; give one weight per cube")
    if not all(math.isfinite(w) for w in weights):
        raise InvalidArgumentError(f"merge weights must be finite numbers, got {weights}")
    if method in ("ties", "dare_linear", "dare_ties"):
        if not 0.0 < density <= 1.0:
            raise InvalidArgumentError(f"density must be in (0, 1], got {density}")
    elif density != 1.0:
        raise InvalidArgumentError(f"density applies to ties and dare merges, not {method!r}")
    if rank is not None and (method != "svd" or rank < 1):
        raise InvalidArgumentError(f"rank must be a positive int and applies to svd merges only, got {rank}")
    if majority_sign_method not in _SIGN_METHODS:
        raise InvalidArgumentError(
            f"unknown majority_sign_method {majority_sign_method!r}", hint=f"use one of {_SIGN_METHODS}"
        )
    for cube in cubes:
        if cube.manifest.kind != cube_pb2.CUBE_KIND_LORA:
            raise UnsupportedError(f"cube {cube.ref} is not a LoRA cube; only LoRA cubes merge")
    return weights


def _check_same_base_model(cubes: Sequence[MemCube]) -> None:
    """Refuse cubes made for different base weights: their deltas do not add up to anything."""
    first = cubes[0].manifest.base_model
    for cube in cubes[1:]:
        reasons = mismatch_reasons(first, cube.manifest.base_model)
        if reasons:
            raise IncompatibleModelError(
                f"cube {cubes[0].ref} was made for {describe(first)} but cube {cube.ref} for "
                f"{describe(cube.manifest.base_model)}; they differ in: {', '.join(reasons)}",
                hint="merge only cubes of one base model; move knowledge across models through text",
            )


def _read_lora(cube: MemCube) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module: (A, B, scaling)} of one verified cube; non-finite values or stray tensors are refused."""
    cube.verify()
    tensors = cube.tensors()
    out = {}
    for target in cube.manifest.payload.lora.targets:
        a = tensors.pop(f"{target.module}.lora_A.weight", None)
        b = tensors.pop(f"{target.module}.lora_B.weight", None)
        if a is None or b is None:
            raise InvalidArgumentError(f"cube {cube.ref} lacks the LoRA factors of {target.module!r}")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[0] != target.rank:
            raise InvalidArgumentError(
                f"cube {cube.ref}, module {target.module!r}: A {tuple(a.shape)} and B {tuple(b.shape)} "
                f"are not a rank-{target.rank} LoRA pair"
            )
        if not (a.is_floating_point() and b.is_floating_point()):
            raise UnsupportedError(f"cube {cube.ref}, module {target.module!r} has non-float factors")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise InvalidArgumentError(f"cube {cube.ref}, module {target.module!r} holds NaN or Inf values")
        out[target.module] = (a, b, float(target.scaling))
    if tensors:
        raise UnsupportedError(
            f"cube {cube.ref} holds tensors other than LoRA factors: {sorted(tensors)[:3]}"
        )
    if not out:
        raise InvalidArgumentError(f"cube {cube.ref} adapts no module")
    return out


def _check_shapes(modules: dict[str, list[_Part]], cubes: Sequence[MemCube]) -> None:
    for module, parts in modules.items():
        shapes = {(int(b.shape[0]), int(a.shape[1])) for _, a, b, _ in parts}
        if len(shapes) > 1:
            names = ", ".join(cubes[i].ref for i, *_ in parts)
            raise InvalidArgumentError(f"module {module!r} has different shapes {sorted(shapes)} in {names}")


def _svd_merge(parts: list[_Part], rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Best rank-``rank`` factors of sum_i c_i B_i A_i, plus (dropped, total) squared singular values.

    With B_cat = Qb Rb and A_cat^T = Qa Ra, the delta is Qb (Rb Ra^T) Qa^T, so the SVD of the small
    core (at most R x R, R the summed rank) gives the delta's exact SVD without forming out x in.
    Like PEFT, the singular values go into B. The rank never exceeds what the delta can have.
    """
    b_cat = torch.cat([c * b for _, _, b, c in parts], dim=1)
    a_cat = torch.cat([a for _, a, _, _ in parts], dim=0)
    qb, rb = torch.linalg.qr(b_cat)
    qa, ra = torch.linalg.qr(a_cat.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    r = min(rank, s.numel())
    b = (qb @ u[:, :r]) * s[:r]
    a = vh[:r] @ qa.T
    return a, b, float((s[r:] ** 2).sum()), float((s**2).sum())


def _factor_merge(
    module: str,
    parts: list[_Part],
    method: str,
    cubes: Sequence[MemCube],
    density: float,
    sign_method: str,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's factor-wise merge: combine the A's and the B's separately with sqrt|c| weights."""
    ranks = {int(a.shape[0]) for _, a, _, _ in parts}
    if len(ranks) > 1:
        names = ", ".join(f"{cubes[i].ref} (r={a.shape[0]})" for i, a, _, _ in parts)
        raise InvalidArgumentError(
            f"{method} merge needs equal LoRA ranks, but module {module!r} has {names}",
            hint="use method 'cat' (exact, ranks add) or 'svd' (any ranks, truncated to one rank)",
        )
    roots = [math.sqrt(abs(c)) for *_, c in parts]
    signed = [r if p[3] >= 0 else -r for r, p in zip(roots, parts, strict=True)]  # sign on A only
    merged = []
    for part, slot, w in (("A", 1, signed), ("B", 2, roots)):
        tensors = [p[slot] for p in parts]
        if method.startswith("dare"):
            tensors = [_drop(p[slot], density, _generator(seed, module, part, p[0])) for p in parts]
        elif method == "ties":
            tensors = [_trim(t, density) for t in tensors]
        elect = method.endswith("ties")
        merged.append(_combine(torch.stack(tensors), w, elect=elect, sign_method=sign_method))
    return merged[0], merged[1]


def _combine(stacked: torch.Tensor, weights: list[float], *, elect: bool, sign_method: str) -> torch.Tensor:
    """Weighted sum, or with ``elect`` TIES' sign election and disjoint mean (sign from unweighted values)."""
    weighted = stacked * torch.tensor(weights, dtype=stacked.dtype).view(-1, *([1] * (stacked.dim() - 1)))
    if not elect:
        return weighted.sum(dim=0)
    votes = stacked.sum(dim=0) if sign_method == "total" else stacked.sign().sum(dim=0)
    agree = stacked.sign() == torch.where(votes >= 0, 1.0, -1.0).to(stacked.dtype)
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def _trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * numel) largest-magnitude entries (TIES' trim step), zero the rest."""
    if density >= 1.0:
        return t
    keep = torch.zeros(t.numel(), dtype=t.dtype)
    keep[torch.topk(t.abs().reshape(-1), k=int(density * t.numel())).indices] = 1
    return t * keep.view_as(t)


def _drop(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and rescale kept ones, preserving expectation."""
    if density >= 1.0:
        return t
    return t * torch.bernoulli(torch.full_like(t, density), generator=generator) / density


def _generator(seed: int, module: str, part: str, index: int) -> torch.Generator:
    key = hashlib.blake2b(f"{seed}\0{module}\0{part}\0{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1)


def _lineage(cubes: Sequence[MemCube]) -> list[str]:
    """Each parent's own chain, then the parent; first occurrence kept.

    The full ancestry (not only the direct parents) keeps the proto's meaning of ``version_chain``, "parent
    digests, oldest first", and since every digest follows its own ancestors the list stays oldest first.
    The direct parents are also listed in the origin params (``parents``).
    """
    seen: dict[str, None] = {}
    for cube in cubes:
        for digest in [*cube.manifest.version_chain, cube.manifest.digest]:
            seen.setdefault(digest, None)
    return list(seen)


def _build_cube(
    cubes: Sequence[MemCube],
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    fan_in_fan_out: bool,
    params: dict[str, str],
    cube_id: str,
    version: str,
    owner: str,
) -> MemCube:
    """The merged cube: alpha = rank per module (scaling 1, since the factors already carry the scale)."""
    tensors: dict[str, torch.Tensor] = {}
    targets = []
    for module, (a, b) in factors.items():
        tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"] = a, b
        r = int(a.shape[0])
        targets.append(cube_pb2.LoraTarget(module=module, rank=r, alpha=float(r), scaling=1.0))
    top = max(t.rank for t in targets)
    spec = cube_pb2.LoraSpec(
        rank=top,
        alpha=float(top),
        target_modules=sorted({t.module.rsplit(".", 1)[-1] for t in targets}),
        targets=targets,
        fan_in_fan_out=fan_in_fan_out,
    )
    payload = encode_tensors(tensors)
    infos = describe_tensors(payload)
    method = params["method"]
    origin = cube_pb2.Origin(
        method="merge",
        description=f"{method} merge of {len(cubes)} LoRA cubes: {', '.join(c.ref for c in cubes)}",
        sources=[c.ref for c in cubes],
        contributors=list(dict.fromkeys(c.manifest.owner for c in cubes if c.manifest.owner)),
        params=params,
    )
    return MemCube(
        manifest=new_manifest(
            cube_id=cube_id,
            version=version,
            kind="lora",
            digest=payload_digest(payload),
            size_bytes=len(payload),
            base_model=cubes[0].manifest.base_model,
            payload=cube_pb2.PayloadDescription(dtype=dominant_dtype(infos), tensors=infos, lora=spec),
            origin=origin,
            owner=owner,
            version_chain=_lineage(cubes),
            lifecycle="merged",
        ),
        payload=payload,
    )


def merge_in_store(
    store: CubeStore,
    names: Sequence[str],
    weights: Sequence[float] | None = None,
    *,
    method: str = "cat",
    cube_id: str,
    version: str = "1.0.0",
    **options: Any,
) -> MemCube:
    """Merge stored cubes (``id`` or ``id@version`` each) and store the product in state MERGED.

    The parents are read verified from the store and left as they are; nothing is stored when the merge
    is refused. ``options`` go to ``merge_lora_cubes`` (density, rank, majority_sign_method, seed, owner).
    """
    cubes = []
    for name in names:
        parent_id, parent_version = parse_ref(name)
        cubes.append(store.get(parent_id, parent_version))
    merged = merge_lora_cubes(cubes, weights, method=method, cube_id=cube_id, version=version, **options)
    store.put(merged.manifest, merged.payload)
    return merged
