"""Base-model fingerprints: which weights a cube was made for.

A fingerprint holds a digest of the shape-defining config, a digest of every parameter's name and shape,
and a keyed sample of the weights themselves (positions chosen from ``sample_seed``). Two loads of one
model match even in another dtype (fp32 / fp16 / bf16); a different architecture, size or set of weights
(another checkpoint, a full fine-tune) does not. The check is cheap: one gather per parameter tensor.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from memfed.errors import IncompatibleModelError
from memfed.mip.v1 import cube_pb2

if TYPE_CHECKING:
    import torch

BaseModelFingerprint = cube_pb2.BaseModelFingerprint

# A fixed default so every node fingerprints the same positions; a cube records the seed it used.
DEFAULT_SAMPLE_SEED = 0x6D656D666564
SAMPLES_PER_TENSOR = 2
MAX_SAMPLES = 512
# Twice bfloat16's unit roundoff: a bf16 or fp16 load of the same weights stays inside, while any
# training step of practical size moves sampled weights far outside.
SAMPLE_RTOL = 2.0**-7
SAMPLE_ATOL = 1e-6

# Config keys that change with how a model is loaded or saved, not with which weights it has.
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "use_cache",
        "return_dict",
        "output_hidden_states",
        "output_attentions",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "_commit_hash",
        "attn_implementation",
        "architectures",
        "id2label",
        "label2id",
        "problem_type",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
        "tokenizer_class",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "quantization_config",
        "auto_map",
        "task_specific_params",
    }
)


def _canonical_config(config: Any) -> dict[str, Any]:
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in sorted(data.items()) if k not in _VOLATILE_CONFIG_KEYS}


def unwrap_base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain Hugging Face model inside a PEFT wrapper (or ``model`` itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _base_parameters(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The base model's parameters by their plain names, skipping adapter weights a PEFT wrapper adds.

    A PEFT-wrapped model renames wrapped layers (``q_proj.base_layer.weight``); those names are mapped
    back so a model fingerprints the same with or without adapters attached.
    """
    out = []
    for name, param in unwrap_base_model(model).named_parameters():
        if ".lora_" in name or "lora_magnitude" in name:
            continue
        out.append((name.replace(".base_layer.", "."), param))
    out.sort(key=lambda item: item[0])
    return out


def _sample_positions(seed: int, name: str, numel: int, count: int) -> np.ndarray:
    key = struct.pack("<Q", seed)
    derived = hmac.new(key, name.encode(), hashlib.sha256).digest()
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(derived[:16], "little")))
    return rng.integers(0, numel, size=min(count, numel), dtype=np.int64)


def fingerprint_model(
    model: torch.nn.Module, *, seed: int = DEFAULT_SAMPLE_SEED, name: str | None = None
) -> BaseModelFingerprint:
    """Fingerprint a loaded Hugging Face model (or a PEFT wrapper around one)."""
    import torch

    base = unwrap_base_model(model)
    config = base.config
    config_json = json.dumps(_canonical_config(config), sort_keys=True, separators=(",", ":"), default=str)
    params = _base_parameters(model)

    shapes = hashlib.sha256()
    for pname, p in params:
        shapes.update(f"{pname}:{tuple(p.shape)};".encode())

    per_tensor = max(1, min(SAMPLES_PER_TENSOR, MAX_SAMPLES // max(1, len(params))))
    samples: list[float] = []
    with torch.no_grad():
        for pname, p in params:
            if len(samples) >= MAX_SAMPLES:
                break
            idx = _sample_positions(seed, pname, p.numel(), per_tensor)
            picked = p.detach().reshape(-1)[torch.from_numpy(idx).to(p.device)]
            samples.extend(picked.float().cpu().tolist())

    architectures = getattr(config, "architectures", None) or [type(base).__name__]
    fp = BaseModelFingerprint(
        architecture=architectures[0],
        model_type=getattr(config, "model_type", "") or "",
        name=name or _display_name(config),
        config_digest=hashlib.sha256(config_json.encode()).digest(),
        shapes_digest=shapes.digest(),
        sample_seed=seed,
        num_parameters=sum(p.numel() for _, p in params),
    )
    fp.weight_sample.extend(samples)
    fp.fingerprint_id = _fingerprint_id(fp)
    return fp


def _display_name(config: Any) -> str:
    path = getattr(config, "_name_or_path", "") or ""
    return Path(path).name if path else getattr(config, "model_type", "model")


def _fingerprint_id(fp: BaseModelFingerprint) -> str:
    """Short display id. Samples enter rounded to bfloat16 precision so most dtype loads agree; the
    authoritative comparison is :func:`mismatch_reasons`, which uses a tolerance."""
    sample = np.asarray(fp.weight_sample, dtype=np.float32)
    bf16 = (sample.view(np.uint32) + 0x8000) & 0xFFFF0000  # round-half-up to the bf16 grid
    h = hashlib.sha256()
    h.update(fp.config_digest)
    h.update(fp.shapes_digest)
    h.update(struct.pack("<Q", fp.sample_seed))
    h.update(bf16.astype("<u4").tobytes())
    return h.hexdigest()[:16]


def mismatch_reasons(expected: BaseModelFingerprint, actual: BaseModelFingerprint) -> list[str]:
    """What differs between two fingerprints (empty when they name the same base weights)."""
    reasons = []
    if expected.config_digest != actual.config_digest:
        reasons.append("model config")
    if expected.shapes_digest != actual.shapes_digest:
        reasons.append("tensor names/shapes")
    if expected.sample_seed != actual.sample_seed:
        reasons.append("sample seed (fingerprints not comparable)")
    elif not reasons:
        a = np.asarray(expected.weight_sample, dtype=np.float64)
        b = np.asarray(actual.weight_sample, dtype=np.float64)
        if a.shape != b.shape or not np.allclose(a, b, rtol=SAMPLE_RTOL, atol=SAMPLE_ATOL):
            reasons.append("weight values")
    return reasons


def describe(fp: BaseModelFingerprint) -> str:
    """One-line human description used in error messages."""
    millions = fp.num_parameters / 1e6
    return f"{fp.architecture} '{fp.name}' (fingerprint {fp.fingerprint_id}, {millions:.1f}M parameters)"


def check_base_model(expected: BaseModelFingerprint, model: torch.nn.Module, *, what: str) -> None:
    """Raise IncompatibleModelError if ``model`` is not the base model ``expected`` names.

    ``what`` names the cube in the message (e.g. ``"cube legal@1.0.0"``).
    """
    actual = fingerprint_model(model, seed=expected.sample_seed)
    reasons = mismatch_reasons(expected, actual)
    if reasons:
        raise IncompatibleModelError(
            f"{what} was made for {describe(expected)} but the host model is {describe(actual)}; "
            f"they differ in: {', '.join(reasons)}",
            hint="load the base model the cube was made for (--model DIR), or move the knowledge through "
            "text (externalize, then internalize on this model)",
        )
