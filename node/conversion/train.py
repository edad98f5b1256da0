"""Train a LoRA on training items with PEFT, and hand back plain (A, B) factors for a cube.

PEFT does the training (its LoRA layers, its initialisation, its alpha/r scaling), so what the node
serves is exactly what a PEFT user would have trained. PEFT's wrappers live inside the model only for the
length of the call: the model is unwrapped before returning, whatever happens, because a node's module
runtime applies cubes through hooks on the bare layers.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from memfed.errors import InvalidArgumentError
from memfed.node.conversion.augment import TrainingItem

PEFT_PREFIX = "base_model.model."
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class LoraTrainConfig:
    """How to train. Defaults measured on the embedded model (see the conversion tests and bench)."""

    rank: int = 8
    alpha: float = 16.0
    target_modules: str | tuple[str, ...] = "all-linear"
    steps: int | None = None  # None: enough for ~8 passes over the items, at least 60 (see steps_for)
    lr: float = 5e-3
    warmup_steps: int = 10
    batch_size: int = 24  # document items per step
    replay_batch: int = 16  # replay items per step (what the model knew, kept while it learns)
    seed: int = 0

    def steps_for(self, n_items: int) -> int:
        """Steps to train on ``n_items``: as set, else ~8 epochs, at least 60 and at most 600.

        Measured on the embedded model: one 6-fact document (58 items) reaches 0.56-0.67 held-out
        recall after 60 steps; all eight shipped documents (455 items) 0.71 after 150 steps.
        """
        if self.steps is not None:
            return self.steps
        return max(60, min(600, -(-8 * n_items // self.batch_size)))

    def check(self) -> None:
        if (
            self.rank < 1
            or (self.steps is not None and self.steps < 1)
            or self.batch_size < 1
            or not self.lr > 0
        ):
            raise InvalidArgumentError(
                f"rank, steps and batch size must be >= 1 and lr > 0 (got rank={self.rank}, "
                f"steps={self.steps}, batch_size={self.batch_size}, lr={self.lr})"
            )

    def as_params(self) -> dict[str, str]:
        """The settings as an origin's ``params`` (strings), so a cube says how it was trained."""
        targets = self.target_modules
        return {
            "rank": str(self.rank),
            "alpha": str(self.alpha),
            "target_modules": targets if isinstance(targets, str) else ",".join(targets),
            "steps": str(self.steps or "auto"),
            "lr": str(self.lr),
            "seed": str(self.seed),
        }


@dataclass
class TrainedLora:
    """Factors per module path (relative to the base model): A (r, in), B (out, r); and how it went."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    alpha: dict[str, float]
    seconds: float
    final_loss: float
    steps: int


def encode_items(tokenizer: Any, items: Sequence[TrainingItem]) -> list[tuple[list[int], int]]:
    """(token ids, index of the first scored token) per item; an answer is encoded apart, as evaluation
    encodes it, and every item ends with the end-of-sequence token."""
    eos = tokenizer.eos_token_id
    out = []
    for item in items:
        prompt = tokenizer(item.prompt)["input_ids"]
        answer = tokenizer(" " + item.answer, add_special_tokens=False)["input_ids"] if item.answer else []
        ids = [*prompt, *answer, eos] if eos is not None else [*prompt, *answer]
        out.append((ids, 1 if item.whole else len(prompt)))
    return out


def pad_items(
    encoded: Sequence[tuple[list[int], int]], pad_id: int, device: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and the loss mask over next-token targets (1 where a token is scored)."""
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width - 1))
    for i, (seq, start) in enumerate(encoded):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, max(0, start - 1) : len(seq) - 1] = 1.0
    return ids.to(device), mask.to(device)


def lm_loss(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the scored positions."""
    # Right padding under causal attention: real tokens never attend to pads, and pads are not scored.
    logits = model(input_ids=ids).logits[:, :-1].float()
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="none")
    return (nll * mask.reshape(-1)).sum() / mask.sum().clamp(min=1.0)


def train_lora(
    model: torch.nn.Module,
    tokenizer: Any,
    items: Sequence[TrainingItem],
    config: LoraTrainConfig | None = None,
    *,
    replay: Sequence[TrainingItem] = (),
    progress: Progress | None = None,
) -> TrainedLora:
    """Train a PEFT LoRA on ``items`` and return its factors; ``model`` is left bare and unchanged.

    ``replay`` items (the model's own answers to other prompts) are mixed into every step, so learning
    the new facts does not overwrite old ones; without them a few dozen steps erased most of what the
    embedded model knew.
    """
    config = config or LoraTrainConfig()
    config.check()
    if not items:
        raise InvalidArgumentError("nothing to train on", hint="the documents produced no training items")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = encode_items(tokenizer, items)
    replayed = encode_items(tokenizer, replay)
    generator = torch.Generator().manual_seed(config.seed)
    t0 = time.perf_counter()
    items_order = BatchOrder(len(encoded), config.batch_size, generator)
    replay_order = BatchOrder(len(replayed), config.replay_batch, generator)
    steps = config.steps_for(len(encoded))

    def loss_of_next_batch(peft_model: Any) -> torch.Tensor:
        batch = [encoded[i] for i in items_order.next()]
        if replayed and config.replay_batch:
            batch += [replayed[i] for i in replay_order.next()]
        return lm_loss(peft_model, *pad_items(batch, pad, device))

    with peft_lora(model, config) as peft_model:
        loss_value = fit(peft_model, config, steps, loss_of_next_batch, progress)
        factors, alpha = lora_factors(peft_model)
    return TrainedLora(factors, alpha, time.perf_counter() - t0, loss_value, steps)


class BatchOrder:
    """Indices 0..n-1 in shuffled passes, ``size`` at a time; a batch that runs past the end of one pass
    continues into the next (drawn from ``generator``, so a seed fixes every batch)."""

    def __init__(self, n: int, size: int, generator: torch.Generator) -> None:
        self.n, self.size, self.generator = n, size, generator
        self._queue: list[int] = []

    def next(self) -> list[int]:
        if len(self._queue) < self.size:
            self._queue += torch.randperm(self.n, generator=self.generator).tolist()
        chunk, self._queue = self._queue[: self.size], self._queue[self.size :]
        return chunk


def fit(
    peft_model: Any,
    config: LoraTrainConfig,
    steps: int,
    loss_of_next_batch: Callable[[Any], torch.Tensor],
    progress: Progress | None = None,
) -> float:
    """``steps`` AdamW steps (no weight decay, linear warm-up) on the LoRA parameters of ``peft_model``;
    each step's loss comes from ``loss_of_next_batch(peft_model)``. Returns the last loss."""
    opt = torch.optim.AdamW(trainable(peft_model), lr=config.lr, weight_decay=0.0)
    loss_value = float("nan")
    for step in range(steps):
        set_warmup_lr(opt, config, step)
        loss = loss_of_next_batch(peft_model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_value = float(loss.detach())
        if progress is not None:
            progress(step + 1, steps)
    return loss_value


def trainable(peft_model: Any) -> list[torch.nn.Parameter]:
    """The LoRA parameters PEFT left trainable (the base weights are frozen)."""
    return [p for p in peft_model.parameters() if p.requires_grad]


def set_warmup_lr(opt: torch.optim.Optimizer, config: LoraTrainConfig, step: int) -> None:
    """Linear warm-up to ``config.lr`` over ``config.warmup_steps``, then constant."""
    for group in opt.param_groups:
        group["lr"] = config.lr * min(1.0, (step + 1) / max(1, config.warmup_steps))


@contextmanager
def peft_lora(model: torch.nn.Module, config: LoraTrainConfig) -> Iterator[Any]:
    """``model`` wrapped by PEFT with a fresh LoRA of ``config`` (trainable, in train mode) for the block.

    Every trainer of LoRA modules goes through here (documents, steering distillation), so they share
    PEFT's layers and initialisation. The LoRA init draws from the global RNG: it is seeded with
    ``config.seed`` and the caller's stream is left alone. On leaving, PEFT's layers are taken out and the
    original ones put back, whatever happened: the bare model again, in its former mode.
    """
    from peft import LoraConfig, get_peft_model

    was_training = model.training
    # GPT-2's fused Conv1D layers store weights transposed; PEFT needs to be told (or warns and guesses).
    conv1d = any(type(m).__name__ == "Conv1D" for m in model.modules())
    lora_config = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        target_modules=config.target_modules
        if isinstance(config.target_modules, str)
        else list(config.target_modules),
        lora_dropout=0.0,
        fan_in_fan_out=conv1d,
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # PEFT calls a transformers property deprecated in v5; the warning is theirs, not the caller's.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        torch.manual_seed(config.seed)
        peft_model = get_peft_model(model, lora_config)
    try:
        peft_model.train()
        yield peft_model
    finally:
        peft_model.unload()
        model.train(was_training)


def lora_factors(peft_model: Any) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, float]]:
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    alpha: dict[str, float] = {}
    for name, module in peft_model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, torch.nn.ModuleDict) or "default" not in lora_a:
            continue
        path = name.removeprefix(PEFT_PREFIX)
        a = module.lora_A["default"].weight.detach().float().cpu().clone()
        b = module.lora_B["default"].weight.detach().float().cpu().clone()
        factors[path] = (a.contiguous(), b.contiguous())
        alpha[path] = float(module.lora_alpha["default"])
    if not factors:
        raise InvalidArgumentError("PEFT adapted no layer of this model", hint="check target_modules")
    return factors, alpha
