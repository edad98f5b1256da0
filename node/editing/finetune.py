"""The fine-tuning baseline: a LoRA (PEFT) trained on the one fact, the way a user without an editor
would fix it. Used by ``memfed bench edit`` to put the editors' figures and costs next to it.

Settings (the baseline's best honest effort, written into the bench report): rank-8 LoRA on every linear
layer of the blocks, Adam at lr 5e-3, on the rewrite prompt alone, until the new target's loss is below
0.05 nats per token or 60 steps; the adapter is then removed (``unload``), leaving the base model as it
was.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from memfed.node.editing.text import encode
from memfed.node.editing.value import EditRequest


@dataclass(frozen=True)
class FinetuneConfig:
    rank: int = 8
    alpha: float = 16.0
    lr: float = 5e-3
    max_steps: int = 60
    stop_nll: float = 0.05

    def describe(self) -> dict[str, Any]:
        return {
            "library": "peft",
            "adapter": "LoRA",
            "rank": self.rank,
            "alpha": self.alpha,
            "targets": "all linear layers of the blocks",
            "optimizer": "Adam",
            "lr": self.lr,
            "max_steps": self.max_steps,
            "stop_nll": self.stop_nll,
            "data": "the rewrite prompt -> the new target",
        }


def _targets(model: torch.nn.Module) -> list[str]:
    """Names (last path part) of the linear layers inside the decoder blocks."""
    from memfed.node.editing.arch import layout_of, linear_shape

    blocks = layout_of(model).blocks
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in layout_of(model).model.named_modules()
            if linear_shape(module) is not None and name.startswith(blocks)
        }
    )


@contextmanager
def finetuned(
    model: torch.nn.Module, tokenizer: Any, request: EditRequest, config: FinetuneConfig = FinetuneConfig()
) -> Iterator[int]:
    """Train a LoRA on ``request`` and yield the number of steps taken; the model is back to its base
    weights (the adapter unloaded) when the block ends."""
    from peft import LoraConfig, get_peft_model

    enc = encode(tokenizer, request.prompt, None, request.target)
    device = next(model.parameters()).device
    ids = torch.tensor([enc.full], device=device)
    n = len(enc.ids)
    cfg = LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=_targets(model), lora_dropout=0.0)
    peft_model = get_peft_model(model, cfg)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=config.lr)
    steps = 0
    try:
        with torch.enable_grad():
            for steps in range(1, config.max_steps + 1):  # noqa: B007 - reported
                logits = peft_model(input_ids=ids).logits[0, n - 1 : -1].float()
                loss = torch.nn.functional.cross_entropy(logits, ids[0, n:])
                if float(loss.detach()) < config.stop_nll:
                    break
                opt.zero_grad()
                loss.backward()
                opt.step()
        peft_model.eval()
        yield steps
    finally:
        peft_model.unload()
