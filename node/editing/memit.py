"""MEMIT-style batch edit (Meng et al., 2023): many facts at once, spread over several MLP layers.

Each request's target is a change δ of the residual stream at the last edited layer L, at the subject
(found by ``optimize_values`` on block L's output). The change is then written layer by layer: at layer
l the remaining residual (target minus what the layers edited so far already deliver), divided by the
number of layers left, is fitted for every request's keys at once by the least-squares update

    ΔW_l = R Kᵀ (λC + KKᵀ)⁻¹

which trades fitting the batch against keeping ordinary keys (second moment C) unchanged. Spreading over
layers keeps each layer's change small, so a large batch disturbs little. The result is one low-rank edit
(rank = number of keys in the batch per layer), stored in one cube.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from memfed.errors import InvalidArgumentError
from memfed.node.editing.arch import ModelLayout
from memfed.node.editing.keys import context_prefixes, read_groups
from memfed.node.editing.lowrank import LowRankEdit, apply_to_weights
from memfed.node.editing.solve import ridge_update
from memfed.node.editing.value import DEFAULT_VALUE, EditRequest, ValueConfig, optimize_values


@dataclass(frozen=True)
class MemitResult:
    edit: LowRankEdit
    layers: tuple[int, ...]
    value_nll: list[float]
    steps: int


def memit_edit(
    layout: ModelLayout,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    layers: Sequence[int],
    second_moments: dict[int, torch.Tensor],
    *,
    lam: float = 10.0,
    prefixes: Sequence[str] | None = None,
    config: ValueConfig = DEFAULT_VALUE,
    token: str = "last",
) -> MemitResult:
    """One edit writing every request into the down-projections of ``layers`` (computed, not applied)."""
    layers = sorted({layout.check_layer(layer) for layer in layers})
    if not layers:
        raise InvalidArgumentError("MEMIT needs at least one layer")
    if not requests:
        raise InvalidArgumentError("no edit requests given")
    if prefixes is None:
        prefixes = context_prefixes(layout.model, tokenizer)
    top = layout.block(layers[-1])
    pairs = [(r.prompt, r.subject) for r in requests]
    values = optimize_values(layout, tokenizer, top, requests, prefixes, config, token=token)
    start = read_groups(layout, tokenizer, pairs, prefixes, {"z": (top, False)}, token)
    targets = [g["z"] + values.delta[i] for i, g in enumerate(start)]
    param = next(layout.model.parameters())
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    try:
        for done, layer in enumerate(layers):
            reads = read_groups(
                layout,
                tokenizer,
                pairs,
                prefixes,
                {"k": (layout.down(layer), True), "z": (top, False)},
                token,
            )
            keys = torch.cat([g["k"] for g in reads])
            resid = torch.cat([t - g["z"] for t, g in zip(targets, reads, strict=True)]) / (
                len(layers) - done
            )
            a, b = ridge_update(keys, resid, second_moments[layer], lam)
            piece = LowRankEdit(
                {layout.down_proj[layer]: (a.to(param.device, param.dtype), b.to(param.device, param.dtype))}
            )
            handles.append(apply_to_weights(layout.model, piece))  # later layers see this one's effect
            factors.update(piece.factors)
    finally:
        for h in reversed(handles):
            h.restore()
    return MemitResult(LowRankEdit(factors), tuple(layers), [float(x) for x in values.nll], values.steps)
