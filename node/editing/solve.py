"""Closed-form least-change weight updates: map given keys to given value changes, spending the change
where ordinary keys (second moment C) do not live.

Two forms, both returned as LoRA-style factors (A (p×in), B (out×p), ΔW = B·A):

- ``exact_update`` (ROME): ΔW K = R exactly, with the smallest C-weighted change,
  ΔW = R (KᵀC⁻¹K)⁻¹ (C⁻¹K)ᵀ. One key gives ROME's rank-one formula.
- ``ridge_update`` (MEMIT): minimise ‖ΔW K − R‖² + λ·tr(ΔW C ΔWᵀ), ΔW = R Kᵀ(λC + KKᵀ)⁻¹ = R (M⁻¹K)ᵀ; trades
  fitting many keys at once against preserving the others, which is what lets a batch share one layer.
"""

from __future__ import annotations

import torch


def _reg(c: torch.Tensor, ridge: float) -> torch.Tensor:
    c = c.double()
    return c + ridge * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)


def exact_update(
    keys: torch.Tensor, resid: torch.Tensor, c: torch.Tensor, *, ridge: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of the smallest C-weighted ΔW with ΔW·kᵢ = rᵢ for every row i of ``keys`` (p, in) and
    ``resid`` (p, out)."""
    k = keys.double().T  # (in, p)
    cinv_k = torch.linalg.solve(_reg(c, ridge), k)  # (in, p)
    gram = k.T @ cinv_k  # (p, p)
    gram = gram + 1e-9 * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    a = torch.linalg.solve(gram, cinv_k.T)  # (p, in)
    return a.float(), resid.double().T.float()


def ridge_update(
    keys: torch.Tensor, resid: torch.Tensor, c: torch.Tensor, lam: float, *, ridge: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of ΔW = R Kᵀ(λC + KKᵀ)⁻¹ for ``keys`` (p, in) and ``resid`` (p, out)."""
    k = keys.double().T
    m = lam * _reg(c, ridge) + k @ k.T
    a = torch.linalg.solve(m, k).T  # (p, in)
    return a.float(), resid.double().T.float()
