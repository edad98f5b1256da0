"""Train a candidate next version from feedback: DPO on preference pairs plus SFT, from the current LoRA.

The candidate *starts from the current version's factors* (copied into PEFT's LoRA layers, same rank,
alpha and targets), so it is the current module nudged by feedback rather than a module relearned from
scratch; the reference policy of DPO is that same starting point, computed once before the first step.

Loss per step, summed:

- DPO (Rafailov et al. 2023) on (prompt, chosen, rejected) pairs: ``-log σ(β[(log π(c) - log π_ref(c))
  - (log π(r) - log π_ref(r))])``, log-probabilities summed over the answer tokens and end of sequence,
  each pair weighted by the trust behind it. It moves probability from the rejected answer to the
  chosen one without pulling the rest of the distribution around.
- SFT on the chosen answers (mean token negative log-likelihood per answer, trust-weighted): DPO alone
  only widens a margin, and on a model this small a widened margin did not always make the chosen
  answer the greedy one; the SFT term does.
- Replay: the current version's own greedy answers to other prompts (the validation facts' trained
  phrasings and the host's world facts), so teaching the corrected facts does not overwrite the rest
  (the same self-distillation internalization uses).

Everything else (PEFT's layers, the optimizer, warm-up, batching) is the shared loop of
``memfed.node.conversion.train``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from memfed.cube.core import MemCube
from memfed.errors import UnsupportedError
from memfed.node.conversion.augment import TrainingItem
from memfed.node.conversion.train import (
    PEFT_PREFIX,
    BatchOrder,
    LoraTrainConfig,
    TrainedLora,
    encode_items,
    fit,
    lm_loss,
    lora_factors,
    pad_items,
    peft_lora,
)
from memfed.node.evolve.settings import EvolveSettings
from memfed.node.runtime import LORA_PARTS

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Preferred:
    """An answer to teach for a prompt, with the trust behind it; ``whole``: score the prompt's tokens
    too (a statement the module should be able to produce, as internalization's rewrites are)."""

    prompt: str
    answer: str
    weight: float
    whole: bool = False


@dataclass(frozen=True)
class Pair:
    """A preference: ``chosen`` over ``rejected`` for ``prompt``, with the trust behind it."""

    prompt: str
    chosen: str
    rejected: str
    weight: float


@dataclass(frozen=True)
class StartPoint:
    """A LoRA cube's factors as stored (scaling not folded in) and the PEFT settings that reproduce it."""

    factors: Factors
    rank: int
    alpha: float

    @classmethod
    def of(cls, cube: MemCube) -> StartPoint:
        """The start point of a LoRA cube; UnsupportedError for other kinds or mixed ranks / alphas
        (PEFT trains one rank and alpha for every target)."""
        spec = cube.manifest.payload.lora
        if not spec.targets:
            raise UnsupportedError(
                f"cube {cube.ref} is not a LoRA module; only LoRA modules evolve from feedback",
                hint="edit cubes change through `memfed edit apply`",
            )
        if len({(t.rank, t.alpha) for t in spec.targets}) != 1:
            raise UnsupportedError(
                f"cube {cube.ref} mixes ranks or alphas across its layers; it cannot be trained further",
                hint="evolve modules trained by memfed (one rank and alpha for every layer)",
            )
        tensors = cube.tensors()
        a_part, b_part = LORA_PARTS
        factors = {
            t.module: (tensors[f"{t.module}.{a_part}"].float(), tensors[f"{t.module}.{b_part}"].float())
            for t in spec.targets
        }
        return cls(factors, int(spec.targets[0].rank), float(spec.targets[0].alpha))

    def config(self, settings: EvolveSettings) -> LoraTrainConfig:
        return LoraTrainConfig(
            rank=self.rank,
            alpha=self.alpha,
            target_modules=tuple(sorted(self.factors)),
            steps=settings.steps,
            lr=settings.lr,
            warmup_steps=settings.warmup_steps,
            batch_size=settings.batch_size,
            replay_batch=settings.replay_batch,
            seed=settings.seed,
        )


def train_candidate(
    model: torch.nn.Module,
    tokenizer: Any,
    start: StartPoint,
    preferred: Sequence[Preferred],
    pairs: Sequence[Pair],
    replay: Sequence[TrainingItem],
    settings: EvolveSettings,
) -> TrainedLora:
    """Train from ``start`` on the feedback (see the module docstring); ``model`` is left bare."""
    config = start.config(settings)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sft = encode_items(tokenizer, [TrainingItem(p.prompt, p.answer, p.whole, "feedback") for p in preferred])
    sft_w = torch.tensor([p.weight for p in preferred], device=device)
    chosen = encode_items(tokenizer, [TrainingItem(p.prompt, p.chosen, False, "chosen") for p in pairs])
    rejected = encode_items(tokenizer, [TrainingItem(p.prompt, p.rejected, False, "rejected") for p in pairs])
    pair_w = torch.tensor([p.weight for p in pairs], device=device)
    replayed = encode_items(tokenizer, replay)
    generator = torch.Generator().manual_seed(settings.seed)
    orders = {
        "sft": BatchOrder(len(sft), min(len(sft), settings.batch_size), generator),
        "pairs": BatchOrder(len(pairs), min(len(pairs), settings.batch_size), generator),
        "replay": BatchOrder(len(replayed), min(len(replayed), settings.replay_batch), generator),
    }
    t0 = time.perf_counter()
    with peft_lora(model, config) as peft_model:
        _load_factors(peft_model, start.factors)
        ref_chosen = ref_rejected = torch.zeros(0)
        if pairs:
            with torch.no_grad():  # the reference policy: the start point, before any step
                ref_chosen = _answer_logprobs(peft_model, chosen, pad, device)[0]
                ref_rejected = _answer_logprobs(peft_model, rejected, pad, device)[0]

        def loss_of_next_batch(m: Any) -> torch.Tensor:
            loss = torch.zeros((), device=device)
            if sft and settings.sft_weight:
                idx = orders["sft"].next()
                logp, n = _answer_logprobs(m, [sft[i] for i in idx], pad, device)
                w = sft_w[idx]
                loss = loss + settings.sft_weight * ((-logp / n) * w).sum() / w.sum()
            if pairs and settings.dpo_weight:
                idx = orders["pairs"].next()
                logp_c = _answer_logprobs(m, [chosen[i] for i in idx], pad, device)[0]
                logp_r = _answer_logprobs(m, [rejected[i] for i in idx], pad, device)[0]
                margin = (logp_c - ref_chosen[idx].to(device)) - (logp_r - ref_rejected[idx].to(device))
                w = pair_w[idx]
                dpo = -(F.logsigmoid(settings.dpo_beta * margin) * w).sum() / w.sum()
                loss = loss + settings.dpo_weight * dpo
            if replayed and settings.replay_batch:
                batch = [replayed[i] for i in orders["replay"].next()]
                loss = loss + lm_loss(m, *pad_items(batch, pad, device))
            return loss

        final = fit(peft_model, config, settings.steps, loss_of_next_batch)
        factors, alpha = lora_factors(peft_model)
    return TrainedLora(factors, alpha, time.perf_counter() - t0, final, settings.steps)


def _load_factors(peft_model: Any, factors: Factors) -> None:
    """Copy the current version's (A, B) into PEFT's freshly made LoRA layers."""
    loaded = set()
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            path = name.removeprefix(PEFT_PREFIX)
            lora_a = getattr(module, "lora_A", None)
            if path not in factors or not isinstance(lora_a, torch.nn.ModuleDict) or "default" not in lora_a:
                continue
            a, b = factors[path]
            module.lora_A["default"].weight.copy_(a)
            module.lora_B["default"].weight.copy_(b)
            loaded.add(path)
    missing = set(factors) - loaded
    if missing:
        raise UnsupportedError(
            f"PEFT made no LoRA layer for {sorted(missing)[:3]}; the module cannot be trained further",
            hint="the module targets layers PEFT does not adapt on this model",
        )


def _answer_logprobs(
    model: Any, encoded: Sequence[tuple[list[int], int]], pad: int, device: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each item's scored tokens, how many tokens were scored)."""
    ids, mask = pad_items(encoded, pad, device)
    logits = model(input_ids=ids).logits[:, :-1].float()
    logp = torch.gather(F.log_softmax(logits, dim=-1), 2, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(dim=1), mask.sum(dim=1).clamp(min=1.0)
