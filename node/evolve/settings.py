"""The evolve vocabulary: what an evolver is tuned by (``EvolveSettings``) and what it decides
(``EvolveDecision``).

Kept apart from the evolver so the feedback log (which enforces the rate limit) and the evolver (which
uses everything else) read one settings object without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from memfed.errors import InvalidArgumentError

Action = Literal["promoted", "discarded", "rolled_back", "waiting"]
ACTIONS: tuple[str, ...] = ("promoted", "discarded", "rolled_back", "waiting")


@dataclass(frozen=True)
class EvolveSettings:
    """When a module evolves, how the candidate is trained and what it must show to be published.

    Defaults are measured on the embedded model (``memfed.bench.evolve_feedback``): a rank-8 module
    evolves from about 40-100 feedback items in 40 steps (a few seconds on two CPU cores).
    """

    # -- when ----------------------------------------------------------------------------------------
    threshold: int = 24  # new feedback items since the last attempt before a candidate is trained
    min_principals: int = 3  # distinct principals (with weight left after the guards) behind a change
    rate_limit_per_hour: int = 200  # feedback items one principal may give in any hour, over all cubes
    # -- guards against poisoned feedback -------------------------------------------------------------
    min_trust: float = 0.35  # a principal whose votes agree with the consensus less than this is ignored
    drop_contradictions: bool = True  # feedback that contradicts the module's validation set is dropped
    # -- the gates -----------------------------------------------------------------------------------
    holdout_fraction: float = 0.25  # share of the feedback prompts kept out of training to validate on
    min_feedback_gain: float = 0.0  # the candidate must beat the current version by more than this
    max_validation_drop: float = 0.01  # ... and lose at most this much recall on the validation set
    # -- after promotion -----------------------------------------------------------------------------
    regression_margin: float = 0.1  # live good-rate drop (new vs old version) that rolls back
    regression_min_samples: int = 20  # live items on the new version before that comparison counts
    # -- training (the candidate starts from the current version's LoRA factors) ----------------------
    steps: int = 40
    lr: float = 2e-3
    batch_size: int = 16  # preferred answers (SFT) per step; preference pairs use the same size
    replay_batch: int = 16  # the current version's own answers to other prompts, kept while it learns
    replay_world_prompts: int = 64  # prompts about the host's own facts in the replay set
    dpo_beta: float = 0.1
    dpo_weight: float = 1.0
    sft_weight: float = 1.0
    warmup_steps: int = 5
    seed: int = 0

    def check(self) -> None:
        """Refuse settings that cannot work, naming the field (InvalidArgumentError)."""
        problems = [
            name
            for name, ok in (
                ("threshold", self.threshold >= 1),
                ("min_principals", self.min_principals >= 1),
                ("rate_limit_per_hour", self.rate_limit_per_hour >= 1),
                ("min_trust", 0.0 <= self.min_trust <= 1.0),
                ("holdout_fraction", 0.0 < self.holdout_fraction < 1.0),
                ("max_validation_drop", 0.0 <= self.max_validation_drop <= 1.0),
                ("regression_margin", 0.0 <= self.regression_margin <= 1.0),
                ("regression_min_samples", self.regression_min_samples >= 1),
                ("steps", self.steps >= 1),
                ("lr", self.lr > 0),
                ("batch_size", self.batch_size >= 1),
                ("replay_batch", self.replay_batch >= 0),
                ("dpo_beta", self.dpo_beta > 0),
            )
            if not ok
        ]
        if problems:
            raise InvalidArgumentError(
                f"evolve settings out of range: {', '.join(problems)}",
                hint="counts must be >= 1, fractions in [0, 1] (holdout strictly inside), lr and beta > 0",
            )


@dataclass(frozen=True)
class EvolveDecision:
    """What one ``Evolver.step`` decided for a cube, and why; ``figures`` holds what was measured."""

    cube_id: str
    action: Action
    reason: str
    from_version: str | None
    to_version: str | None = None
    figures: dict[str, float] = field(default_factory=dict)
    id: int | None = None  # row id once recorded
    at: float | None = None  # Unix seconds once recorded
