"""Where a causal LM keeps what editing touches: its blocks, each block's MLP down-projection, attention.

Why a layout object: every editing step (tracing, key statistics, ROME/MEMIT updates, the codebook hook)
names "layer i's MLP down-projection" or "layer i's residual output". Hugging Face models spell those
differently (``model.layers.3.mlp.down_proj`` in Llama/Qwen, ``transformer.h.3.mlp.c_proj`` in GPT-2,
whose Conv1D stores its weight transposed). Resolving the names once, with a clear error for a model we
cannot edit, keeps that knowledge in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memfed.cube.fingerprint import unwrap_base_model
from memfed.errors import InvalidArgumentError, UnsupportedError

# Down-projection names (the MLP's output linear layer) across common architectures.
_DOWN_NAMES = ("down_proj", "c_proj", "fc_out", "dense_4h_to_h", "fc2", "w2")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")


def is_conv1d(module: torch.nn.Module) -> bool:
    """GPT-2's ``Conv1D``: a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D"


def linear_shape(module: torch.nn.Module) -> tuple[int, int] | None:
    """(in, out) features of an ``nn.Linear`` or ``Conv1D``; None for anything else."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return None


@dataclass(frozen=True)
class ModelLayout:
    """Resolved module paths of one model. Paths are relative to the unwrapped base model."""

    model: torch.nn.Module
    blocks: tuple[str, ...]  # per layer: the decoder block (its output is the residual stream)
    down_proj: tuple[str, ...]  # per layer: the MLP's down-projection (keys in, values out)
    attention: tuple[str | None, ...]  # per layer: the attention module, when one is recognised
    key_dim: int  # down-projection input features (the "key" space)
    value_dim: int  # down-projection output features (the hidden size)

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def check_layer(self, layer: int) -> int:
        """``layer`` if this model has it, else a clear error naming the valid range."""
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise InvalidArgumentError(
                f"layer {layer!r} does not exist: this model has layers 0..{self.num_layers - 1}",
                hint="pick one of those (memfed edit trace shows where a fact is stored)",
            )
        return layer

    def module(self, path: str) -> torch.nn.Module:
        return self.model.get_submodule(path)

    def down(self, layer: int) -> torch.nn.Module:
        return self.module(self.down_proj[self.check_layer(layer)])

    def block(self, layer: int) -> torch.nn.Module:
        return self.module(self.blocks[self.check_layer(layer)])

    def embeddings(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()

    def layer_of(self, down_path: str) -> int:
        """The layer index of a down-projection path (a cube target); error if it is not one."""
        try:
            return self.down_proj.index(down_path)
        except ValueError:
            raise InvalidArgumentError(
                f"{down_path!r} is not an MLP down-projection of this model",
                hint=f"down-projections here: {', '.join(self.down_proj)}",
            ) from None


def _num_layers(config: object) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _find_blocks(model: torch.nn.Module) -> str | None:
    want = _num_layers(getattr(model, "config", None))
    for name, module in model.named_modules():
        if (
            isinstance(module, torch.nn.ModuleList)
            and len(module) > 0
            and (want is None or len(module) == want)
        ):
            return name
    return None


def _child(block: torch.nn.Module, names: tuple[str, ...]) -> tuple[str, torch.nn.Module] | None:
    for name in names:
        child = getattr(block, name, None)
        if isinstance(child, torch.nn.Module):
            return name, child
    return None


def _down_in(block: torch.nn.Module) -> str | None:
    mlp = _child(block, _MLP_NAMES)
    scopes = [(f"{mlp[0]}.", mlp[1])] if mlp else []
    scopes.append(("", block))  # OPT-style: fc1/fc2 directly in the block
    for prefix, scope in scopes:
        found = _child(scope, _DOWN_NAMES)
        if found and linear_shape(found[1]) is not None and not (prefix == "" and found[0] == "c_proj"):
            return prefix + found[0]
    return None


def layout_of(model: torch.nn.Module) -> ModelLayout:
    """Resolve ``model``'s editable modules, or raise UnsupportedError saying what was not found."""
    base = unwrap_base_model(model)
    blocks = _find_blocks(base)
    arch = type(base).__name__
    if blocks is None:
        raise UnsupportedError(
            f"{arch}: no stack of decoder blocks found, so there is nothing to edit",
            hint="editing needs a decoder-only transformer (Llama, Qwen, GPT-2 style)",
        )
    stack = base.get_submodule(blocks)
    downs: list[str] = []
    attns: list[str | None] = []
    for i, block in enumerate(stack):
        down = _down_in(block)
        if down is None:
            raise UnsupportedError(
                f"{arch}: block {i} has no recognised MLP down-projection",
                hint=f"editing knows MLPs named {'/'.join(_MLP_NAMES)} with an output layer named "
                f"{'/'.join(_DOWN_NAMES)} (nn.Linear or Conv1D)",
            )
        downs.append(f"{blocks}.{i}.{down}")
        attn = _child(block, _ATTN_NAMES)
        attns.append(f"{blocks}.{i}.{attn[0]}" if attn else None)
    shape = linear_shape(base.get_submodule(downs[0]))
    assert shape is not None
    return ModelLayout(
        model=base,
        blocks=tuple(f"{blocks}.{i}" for i in range(len(stack))),
        down_proj=tuple(downs),
        attention=tuple(attns),
        key_dim=shape[0],
        value_dim=shape[1],
    )
