"""A low-rank weight edit ΔW = B·A per MLP down-projection: what ROME and MEMIT produce.

Why factors and not matrices: a rank-one ROME edit of a 384→128 layer is 512 numbers instead of 49,152,
and in the LoRA naming (A = Vᵀ (r×in), B = U (out×r)) the node runtime runs it as a module: activated in
O(1), removed by deactivating, base weights untouched. For users without the runtime the edit can also
be written into the weights (W += B·A; for GPT-2's Conv1D, whose weight is stored (in, out), W += (B·A)ᵀ);
the returned handle keeps the touched weights' original values, so undoing restores them bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from memfed.errors import InvalidArgumentError, NotFoundError
from memfed.node.editing.arch import is_conv1d, linear_shape


@dataclass(frozen=True)
class LowRankEdit:
    """``{module path: (A (r, in), B (out, r))}`` with ΔW = B·A in (out, in) orientation."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]

    def __post_init__(self) -> None:
        for name, (a, b) in self.factors.items():
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise InvalidArgumentError(
                    f"edit of {name}: A {tuple(a.shape)} and B {tuple(b.shape)} do not pair"
                )

    @property
    def modules(self) -> list[str]:
        return sorted(self.factors)

    @property
    def rank(self) -> int:
        return max((int(a.shape[0]) for a, _ in self.factors.values()), default=0)

    def delta(self, module: str) -> torch.Tensor:
        """ΔW of ``module`` as a dense (out, in) matrix."""
        a, b = self.factors[module]
        return b.float() @ a.float()

    def concat(self, other: LowRankEdit) -> LowRankEdit:
        """Both edits at once: factors side by side along the rank axis (the sum of the ΔW's)."""
        out = dict(self.factors)
        for name, (a, b) in other.factors.items():
            if name in out:
                a0, b0 = out[name]
                out[name] = (torch.cat([a0, a.to(a0)], 0), torch.cat([b0, b.to(b0)], 1))
            else:
                out[name] = (a, b)
        return LowRankEdit(out)


@dataclass
class WeightHandle:
    """An edit written into the weights; ``restore`` puts the original values back exactly."""

    model: torch.nn.Module
    originals: dict[str, torch.Tensor] = field(default_factory=dict)

    @torch.no_grad()
    def restore(self) -> None:
        for name, saved in self.originals.items():
            self.model.get_submodule(name).weight.copy_(saved)
        self.originals.clear()

    def __enter__(self) -> WeightHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def _module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise NotFoundError(
            f"the model has no module {name!r}", hint="the edit was made for another model"
        ) from None
    if linear_shape(module) is None:
        raise InvalidArgumentError(f"module {name!r} is not a linear layer")
    return module


@torch.no_grad()
def _add(model: torch.nn.Module, edit: LowRankEdit, sign: float) -> None:
    for name in edit.modules:
        module = _module(model, name)
        w = module.weight
        in_f, out_f = linear_shape(module)  # type: ignore[misc]
        a, b = edit.factors[name]
        if tuple(a.shape[1:]) != (in_f,) or b.shape[0] != out_f:
            raise InvalidArgumentError(
                f"edit of {name} maps {a.shape[1]}->{b.shape[0]} features but the layer maps {in_f}->{out_f}"
            )
        d = edit.delta(name).to(device=w.device)
        if is_conv1d(module):
            d = d.T
        w.add_(d.to(w.dtype), alpha=sign)


def apply_to_weights(model: torch.nn.Module, edit: LowRankEdit) -> WeightHandle:
    """W += B·A in every edited layer, O(layer size); the handle undoes it exactly."""
    handle = WeightHandle(model)
    for name in edit.modules:
        handle.originals[name] = _module(model, name).weight.detach().clone()
    try:
        _add(model, edit, 1.0)
    except Exception:
        handle.restore()
        raise
    return handle


def remove_from_weights(model: torch.nn.Module, edit: LowRankEdit) -> None:
    """W −= B·A: undo an edit applied in an earlier session (exact up to float rounding)."""
    _add(model, edit, -1.0)
