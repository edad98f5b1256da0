"""What a leaker may do to a marked LoRA before passing it on: the attacks the watermark must survive.

Shared by the watermark tests (pass/fail) and ``memfed bench watermark`` (z per attack for the report), so
both measure the same transformations. torch is imported inside the functions: ``memfed.crypto`` does not
import torch at module level.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from memfed.crypto.watermark import lora_pairs

# Issue 11's list: casts, 8-bit round trip, 30% magnitude pruning, Gaussian noise at 10% of the weights'
# std, a linear merge at weight 0.5 with another module, 50 further training steps.
ATTACKS: tuple[str, ...] = ("fp16", "bf16", "int8", "prune30", "noise10", "merge05", "train50")

Tensors = dict[str, Any]  # cube naming: "<module>.lora_A.weight" / "<module>.lora_B.weight" -> tensor


def quant8(t: Any) -> Any:
    """Symmetric per-tensor int8 round trip (what a leaker's 8-bit export does)."""
    scale = t.abs().max() / 127
    return (t / scale).round().clamp(-127, 127) * scale


def prune(t: Any, frac: float) -> Any:
    """Zero the ``frac`` smallest-magnitude entries."""
    import torch

    k = int(frac * t.numel())
    cut = t.abs().flatten().kthvalue(k).values
    return torch.where(t.abs() <= cut, torch.zeros_like(t), t)


def merge(a: Tensors, b: Tensors, w: float) -> Tensors:
    """Exact linear merge of the products: ΔW = w·B1A1 + (1−w)·B2A2, stored by concatenating the factors
    (rank 2r; PEFT's ``cat``). Averaging A's and B's separately is not a merge of the modules (cross
    terms; see FIELD-NOTES)."""
    import torch

    out = {}
    pairs_b = lora_pairs(b)
    for mod, (a1, b1) in lora_pairs(a).items():
        a2, b2 = pairs_b[mod]
        out[f"{mod}.lora_A.weight"] = torch.cat([a1, a2], 0)
        out[f"{mod}.lora_B.weight"] = torch.cat([w * b1, (1 - w) * b2], 1)
    return out


def apply_attack(
    name: str,
    marked: Tensors,
    *,
    other: Tensors | None = None,
    retrain: Callable[[Tensors], Tensors] | None = None,
) -> Tensors:
    """``marked`` after attack ``name``. ``other`` is the module merged in by "merge05"; ``retrain`` runs
    the caller's 50 further training steps from the given tensors for "train50" (it needs the caller's
    model and data, which this module does not own)."""
    import torch

    if name == "fp16":
        return {k: v.half() for k, v in marked.items()}
    if name == "bf16":
        return {k: v.bfloat16() for k, v in marked.items()}
    if name == "int8":
        return {k: quant8(v) for k, v in marked.items()}
    if name == "prune30":
        return {k: prune(v, 0.30) for k, v in marked.items()}
    if name == "noise10":
        g = torch.Generator().manual_seed(5)
        return {k: v + 0.10 * v.std() * torch.randn(v.shape, generator=g) for k, v in marked.items()}
    if name == "merge05":
        if other is None:
            raise ValueError("merge05 needs the other module to merge with")
        return merge(marked, other, 0.5)
    if name == "train50":
        if retrain is None:
            raise ValueError("train50 needs a retrain function")
        return retrain(marked)
    raise ValueError(f"unknown attack {name!r}; one of {', '.join(ATTACKS)}")
