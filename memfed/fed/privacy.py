"""Optional client-side clipping + Gaussian noise on a node's update (local differential privacy).

What is clipped and noised is what the node *releases*: its LoRA factors (A_i, B_i), as one flat vector
(every module's A and B). The node clips that vector to L2 norm ``clip`` with Flower's
``clip_inputs_inplace`` (the FlatClip of McMahan et al., what Flower's ``LocalDpMod`` and client-side
fixed clipping do to ``returned − received``: here "received" is zero, since each round trains a fresh
LoRA, so the update *is* the returned factors), then adds N(0, (noise·clip)²) to every entry, before it
signs the reply. Flower's mods cannot be used as such: they run after the ClientApp, so they would
change arrays the node has already signed, and they need the reply's arrays to have the received
arrays' shapes (our update has the round's rank, the shared cube another).

What this means, honestly:

- The guarantee is about the factors. The released vector lies in the ball of radius ``clip`` before
  noise, so replacing the node's whole dataset moves it by at most 2·clip (L2 sensitivity); with noise
  std σ = noise·clip the classic Gaussian-mechanism bound gives, per round, (ε, δ)-local DP with
  ε = 2·sqrt(2·ln(1.25/δ)) / noise (valid for ε ≤ 1, i.e. noise ≳ 10 at δ = 1e-5). ΔW = B·A and
  everything the server computes from it are post-processing, so they are covered too. Rounds compose:
  R rounds cost about R·ε (basic composition); no accountant is run here.
- Noise on the factors is *not* noise on ΔW: the server's ΔW_i is (B+N_B)(A+N_A) = BA + N_B·A + B·N_A
  + N_B·N_A, whose noise is not Gaussian and grows with the factors' size; and clipping
  ‖(A, B)‖ ≤ clip bounds ‖ΔW‖_F ≤ ‖B‖·‖A‖ ≤ clip²/2, not by clip. Utility per unit of ε therefore differs
  from DP-FedAvg on dense weights.
- The noise comes from a fresh OS-seeded generator, not NumPy's global one Flower's
  ``add_gaussian_noise_inplace`` uses: training seeds global RNGs with the round's seed, which the
  server chose, and predictable noise protects nothing.
- A node applies the stricter of the server's round settings and its own (``--dp-clip``/``--dp-noise``
  on ``memfed fed join``), so a server cannot lower a node's protection. The server cannot verify that
  a node added noise; the reply's metrics only report what the node says it did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from memfed.errors import InvalidArgumentError

if TYPE_CHECKING:
    from memfed.fed.aggregate import Factors


@dataclass(frozen=True)
class DpSettings:
    """``clip`` (L2 bound on the flat factor vector; 0 = off) and ``noise`` (multiplier: std = noise·clip)."""

    clip: float = 0.0
    noise: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and math.isfinite(self.noise)) or self.clip < 0 or self.noise < 0:
            raise InvalidArgumentError(f"DP clip and noise must be finite and >= 0, got {self}")
        if self.noise > 0 and self.clip == 0:
            raise InvalidArgumentError("DP noise needs a clipping norm", hint="set --dp-clip as well")

    @property
    def enabled(self) -> bool:
        return self.clip > 0

    @property
    def std(self) -> float:
        return self.noise * self.clip

    def stricter(self, other: DpSettings) -> DpSettings:
        """The tighter clip (of those set) and the larger noise multiplier."""
        clips = [c for c in (self.clip, other.clip) if c > 0]
        return DpSettings(min(clips) if clips else 0.0, max(self.noise, other.noise))


def epsilon_per_round(noise: float, delta: float = 1e-5) -> float:
    """Local-DP ε of one round for noise multiplier ``noise`` (sensitivity 2·clip; inf without noise)."""
    if noise <= 0:
        return math.inf
    return 2.0 * math.sqrt(2.0 * math.log(1.25 / delta)) / noise


def flat_norm(factors: Factors) -> float:
    """L2 norm of every module's A and B together: the vector that is clipped."""
    from flwr.supercore.differential_privacy import get_norm

    return get_norm([t.detach().double().numpy() for ab in factors.values() for t in ab])


def privatize(
    factors: Factors, dp: DpSettings, rng: np.random.Generator | None = None
) -> tuple[Factors, float]:
    """Clip the flat factor vector to ``dp.clip`` and add N(0, dp.std²) noise; return it and the norm
    before clipping. ``factors`` is left untouched; without ``dp.enabled`` it is returned as is."""
    if not dp.enabled:
        return factors, flat_norm(factors)
    import torch
    from flwr.supercore.differential_privacy import clip_inputs_inplace

    modules = sorted(factors)
    arrays = [factors[m][i].detach().double().numpy().copy() for m in modules for i in (0, 1)]
    norm = flat_norm(factors)
    clip_inputs_inplace(arrays, dp.clip)
    if dp.std > 0:
        gen = rng if rng is not None else np.random.default_rng()  # fresh OS entropy, see the module doc
        for arr in arrays:
            arr += gen.normal(0.0, dp.std, arr.shape)
    out: Factors = {}
    for k, m in enumerate(modules):
        a, b = factors[m]
        out[m] = (
            torch.from_numpy(arrays[2 * k]).to(a.dtype).contiguous(),
            torch.from_numpy(arrays[2 * k + 1]).to(b.dtype).contiguous(),
        )
    return out, norm
