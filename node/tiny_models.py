"""Tiny random-init causal LMs for fast unit tests (no training, ~100k parameters, milliseconds).

Tests of machinery that only needs *a* model of a given architecture (PEFT interchange, fingerprints,
cube apply/refuse, scheduler) should not pay for the trained default model. Two architectures, so code
that claims to handle "any Llama/GPT-2-style model" is tested on both module layouts (``q_proj``/``v_proj``
vs. GPT-2's fused ``c_attn``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from memfed.errors import InvalidArgumentError
from memfed.node.offline import ensure_offline
from memfed.node.tokenizer_build import BOS, EOS, PAD, SPECIAL_TOKENS, byte_tokenizer, wrap_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel

TinyKind = Literal["llama", "gpt2"]
TINY_VOCAB = len(SPECIAL_TOKENS) + 256  # the byte tokenizer: specials + one token per byte
TINY_MAX_POSITIONS = 128
_PAD_ID, _BOS_ID, _EOS_ID = (SPECIAL_TOKENS.index(t) for t in (PAD, BOS, EOS))


def tiny_llama(*, seed: int = 0, **config_overrides: Any) -> PreTrainedModel:
    """A random-init ``LlamaForCausalLM`` of ~100k parameters (2 layers, hidden 64), in eval mode.

    ``config_overrides`` go to ``LlamaConfig`` (e.g. ``num_key_value_heads=2`` for GQA).
    """
    ensure_offline()
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg: dict[str, Any] = {
        "vocab_size": TINY_VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": TINY_MAX_POSITIONS,
        "tie_word_embeddings": True,
        "bos_token_id": _BOS_ID,
        "eos_token_id": _EOS_ID,
        "pad_token_id": _PAD_ID,
    }
    cfg.update(config_overrides)
    return _init(LlamaForCausalLM, LlamaConfig(**cfg), seed)


def tiny_gpt2(*, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A random-init ``GPT2LMHeadModel`` of ~120k parameters (2 layers, n_embd 64), in eval mode."""
    ensure_offline()
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg: dict[str, Any] = {
        "vocab_size": TINY_VOCAB,
        "n_embd": 64,
        "n_layer": 2,
        "n_head": 4,
        "n_positions": TINY_MAX_POSITIONS,
        "bos_token_id": _BOS_ID,
        "eos_token_id": _EOS_ID,
        "pad_token_id": _PAD_ID,
    }
    cfg.update(overrides)
    return _init(GPT2LMHeadModel, GPT2Config(**cfg), seed)


def _init(cls: Any, config: Any, seed: int) -> PreTrainedModel:
    # fork_rng: seed the init without disturbing the caller's global torch RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    return model.eval()


def save_tiny_model_dir(kind: TinyKind, out_dir: str | Path, *, seed: int = 0, **overrides: Any) -> Path:
    """Save a tiny model *and* a matching byte-level tokenizer as a loadable HF model directory.

    For tests that need a path to pass as ``--model DIR``. Returns ``out_dir``.
    """
    makers = {"llama": tiny_llama, "gpt2": tiny_gpt2}
    if kind not in makers:
        raise InvalidArgumentError(f"unknown tiny model kind {kind!r}", hint="use 'llama' or 'gpt2'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = makers[kind](seed=seed, **overrides)
    model.save_pretrained(out)
    wrap_tokenizer(byte_tokenizer(), model_max_length=TINY_MAX_POSITIONS).save_pretrained(out)
    return out
