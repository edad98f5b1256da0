"""ROME-style rank-one edit of one MLP down-projection (Meng et al., 2022).

The MLP down-projection W acts as a key→value memory: at the subject's last token its input k (the key)
selects what it writes into the residual stream. The edit makes W map the subject's key k* to a new
value v* = Wk* + δ (δ from ``optimize_values``) while disturbing other keys as little as possible,
measured by the second moment C = E[k kᵀ] of ordinary keys. The closed form is rank one:

    ΔW = δ (C⁻¹k*)ᵀ / (k*ᵀ C⁻¹k*)

with k* the key averaged over context prefixes. Stored as LoRA factors A (1×in) and B = δ (out×1).

Two extensions, both reducing to that formula in the plain case: a subject tokenized two ways (at the
start of a text, without the leading space, and after one) gets one key per form, and ``token="all"``
writes at every subject token (for models that key a fact on the subject's first tokens, which causal
tracing shows). Several keys k₁…k_p with the same δ give ΔW = δ·1ᵀ(KᵀC⁻¹K)⁻¹(C⁻¹K)ᵀ, of rank p.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from memfed.node.editing.arch import ModelLayout
from memfed.node.editing.keys import context_prefixes, subject_key_groups
from memfed.node.editing.lowrank import LowRankEdit
from memfed.node.editing.solve import exact_update
from memfed.node.editing.value import DEFAULT_VALUE, EditRequest, ValueConfig, optimize_values


@dataclass(frozen=True)
class RomeResult:
    edit: LowRankEdit
    layer: int
    value_nll: float  # target NLL (nats/token) reached by the value optimization
    steps: int
    keys: torch.Tensor  # (p, key_dim): the keys the update maps
    delta: torch.Tensor  # (value_dim,): the change it maps each of them to


def rome_edit(
    layout: ModelLayout,
    tokenizer: Any,
    request: EditRequest,
    layer: int,
    second_moment: torch.Tensor,
    *,
    prefixes: Sequence[str] | None = None,
    config: ValueConfig = DEFAULT_VALUE,
    token: str = "last",
) -> RomeResult:
    """The update writing ``request`` into layer ``layer``'s down-projection (computed, not applied)."""
    layout.check_layer(layer)
    if prefixes is None:
        prefixes = context_prefixes(layout.model, tokenizer)
    module = layout.down(layer)
    param = next(layout.model.parameters())
    keys = subject_key_groups(layout, tokenizer, layer, request.prompt, request.subject, prefixes, token)
    values = optimize_values(layout, tokenizer, module, [request], prefixes, config, token=token)
    resid = values.delta[0].unsqueeze(0).expand(keys.shape[0], -1)
    a, b = exact_update(keys, resid, second_moment)
    edit = LowRankEdit(
        {layout.down_proj[layer]: (a.to(param.device, param.dtype), b.to(param.device, param.dtype))}
    )
    return RomeResult(edit, layer, float(values.nll[0]), values.steps, keys, values.delta[0])
