"""MEMIT-style batch edit (Meng et al., 2023): many facts at once, spread over several MLP layers.

Each request's target is a change of the residual stream at the last edited layer L, at the subject. It
is found by optimizing a change δ of the *first* edited layer's output (``optimize_values``) and reading
what that δ makes of layer L's output (a δ optimized at L itself has fewer layers left to carry it to
the answer and converged far worse on the embedded model). Facts of one subject share one δ: they read
the same keys. The change is then written layer by layer: at layer l the remaining residual (target
minus what the layers edited so far already deliver), divided by the number of layers left, is fitted
for every request's keys at once by the least-squares update

    ΔW_l = R Kᵀ (λC + KKᵀ)⁻¹

which trades fitting the batch against keeping ordinary keys (second moment C) unchanged (λ: see
``DEFAULT_LAMBDA``). Keys at subject tokens that several edited subjects share are left out of the fit
(``_distinct_rows``). Spreading over layers keeps each layer's change small. The result is one low-rank
edit (rank = number of keys in the batch per layer), stored in one cube.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from memfed.errors import InvalidArgumentError
from memfed.node.editing.arch import ModelLayout
from memfed.node.editing.keys import GroupReads, context_prefixes, read_groups
from memfed.node.editing.lowrank import LowRankEdit, apply_to_weights
from memfed.node.editing.solve import ridge_update
from memfed.node.editing.value import DEFAULT_VALUE, EditRequest, ValueConfig, optimize_values

# λ weighs the model's ordinary keys (C, a mean over the statistics corpus) against the batch's. MEMIT
# used 15,000 on GPT-J's 16,384-dim keys, where a key's Mahalanobis norm kᵀC⁻¹k is of the order of the
# dimension; scaled to the embedded model's 384 that is a few hundred. At λ = 10 the fit was nearly exact
# (λ far below kᵀC⁻¹k): 100 edits' near-collinear keys blew the update up and locality fell to 0.05-0.2.
DEFAULT_LAMBDA = 300.0


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
    lam: float = DEFAULT_LAMBDA,
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
    bottom, top = layout.block(layers[0]), layout.block(layers[-1])
    pairs = [(r.prompt, r.subject) for r in requests]
    # Facts of one subject read the same keys, so they can only be given one value: optimize one δ per
    # subject, for all its requests together (two δs on one key would be averaged and fit neither).
    index: dict[str, int] = {}
    groups = [index.setdefault(r.subject, len(index)) for r in requests]
    # The value is optimized at the first edited layer's output and its target at the top layer is what
    # that change makes of the top layer's output. Optimizing at the top directly leaves fewer layers to
    # carry the change from the subject to the answer: on the embedded model a δ at block 1 reached a
    # target NLL of 0.65 where the same steps at block 0 reached 0.09.
    values = optimize_values(
        layout, tokenizer, bottom, requests, prefixes, config, token=token, groups=groups
    )
    per_request = values.delta[torch.tensor(groups)]
    targets_reads = read_groups(
        layout, tokenizer, pairs, prefixes, {"z": (top, False)}, token, patch=(bottom, per_request)
    )
    targets = [g["z"] for g in targets_reads]
    owners: dict[int, set[int]] = {}
    for i, g in enumerate(targets_reads):
        for form, pos in g.labels:
            owners.setdefault(form[pos], set()).add(groups[i])
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
            keep = [_distinct_rows(g, groups[i], owners) for i, g in enumerate(reads)]
            keys = torch.cat([g["k"][m] for g, m in zip(reads, keep, strict=True)])
            resid = torch.cat([(t - g["z"])[m] for t, g, m in zip(targets, reads, keep, strict=True)]) / (
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


def _distinct_rows(reads: GroupReads, group: int, owners: dict[int, set[int]]) -> torch.Tensor:
    """Which of a request's keys to fit: those at subject tokens no other subject of the batch has.

    Near the input a key is mostly its token, so the key at a token several edited subjects share
    (" River", " Holdings") is one key asked for several values: fitting them all blows the update up.
    A request whose every token is shared keeps its last one."""
    mask = torch.tensor([owners[form[pos]] == {group} for form, pos in reads.labels], dtype=torch.bool)
    if not bool(mask.any()):
        mask[-1] = True
    return mask
