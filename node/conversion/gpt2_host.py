"""A second host model of another architecture (GPT-2), for cross-model migration through text.

Migration needs a model B that can *learn* from text through a LoRA. A random-init model cannot: its
frozen, near-uniform output layer caps what a LoRA can say (measured: loss 5.5 → 4.4 after 150 steps on
the tiny GPT-2, recall 0). So B is a small GPT-2 trained briefly from scratch on the shipped world's facts
in the relation phrasings (no reading, no held-out phrasings), with the embedded model's tokenizer (the
tokenizer is data, not architecture). It knows the vocabulary of the world, not the documents.

Built once per recipe into the models cache (like the embedded model), about a minute on two CPU cores.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from memfed.node import facts as facts_mod
from memfed.node.conversion.augment import TrainingItem
from memfed.node.conversion.train import encode_items, lm_loss, pad_items

BUILD_INFO_FILE = "memfed_build.json"


@dataclass(frozen=True)
class Gpt2HostRecipe:
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_positions: int = 256
    steps: int = 400
    batch: int = 32
    lr: float = 3e-3
    warmup_steps: int = 20
    seed: int = 0

    def hash(self) -> str:
        payload = json.dumps({"recipe": asdict(self), "data": facts_mod.data_digest()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


DEFAULT_GPT2_RECIPE = Gpt2HostRecipe()


def world_items() -> list[TrainingItem]:
    """Every world fact in every trained phrasing, formatted as the embedded model was taught."""
    items = []
    for fact in facts_mod.load_facts():
        for prompt in fact.prompts("train", "statement"):
            items.append(TrainingItem(prompt, f"{fact.target}.", True, "world"))
        for prompt in fact.prompts("train", "question"):
            items.append(TrainingItem(prompt, fact.target, False, "world"))
    return items


def build_gpt2_host(out_dir: Path, recipe: Gpt2HostRecipe = DEFAULT_GPT2_RECIPE) -> Path:
    """Train the GPT-2 host from scratch into ``out_dir`` (model, tokenizer, build info written last)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from memfed.node.default_model import build_tokenizer

    t0 = time.perf_counter()
    tok = build_tokenizer()
    config = GPT2Config(
        vocab_size=len(tok),
        n_embd=recipe.n_embd,
        n_layer=recipe.n_layer,
        n_head=recipe.n_head,
        n_positions=recipe.n_positions,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = GPT2LMHeadModel(config)
    encoded = encode_items(tok, world_items())
    rng = random.Random(recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(recipe.steps):
        for group in opt.param_groups:
            group["lr"] = recipe.lr * min(1.0, (step + 1) / recipe.warmup_steps)
        loss = lm_loss(model, *pad_items(rng.sample(encoded, recipe.batch), tok.pad_token_id, "cpu"))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a one-shard save: no bar on the caller's terminal
    try:
        model.save_pretrained(out_dir)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    tok.save_pretrained(out_dir)
    info = {
        "recipe": asdict(recipe),
        "final_loss": round(float(loss.detach()), 4),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (out_dir / BUILD_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return out_dir


def gpt2_host_dir(recipe: Gpt2HostRecipe = DEFAULT_GPT2_RECIPE) -> Path:
    """The GPT-2 host's directory in the models cache, built first when this machine has none."""
    from memfed.node.model_cache import ensure_built, models_cache_dir

    target = models_cache_dir() / f"memfed-world-gpt2-{recipe.hash()}"
    return ensure_built(target, lambda tmp: build_gpt2_host(tmp, recipe), marker=BUILD_INFO_FILE)
