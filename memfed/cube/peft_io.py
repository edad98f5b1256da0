"""Hugging Face PEFT interchange: import a LoRA adapter folder as a cube, export a cube back to one.

A PEFT folder is ``adapter_config.json`` + ``adapter_model.safetensors``. Pickled ``adapter_model.bin``
files are refused, never loaded. In the cube, tensor names are module paths relative to the base model
(``model.layers.0.self_attn.q_proj.lora_A.weight``) so cubes from any source share one naming; PEFT's
wrapper prefix is added back on export. The PEFT config is kept verbatim for a faithful export.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memfed.cube.core import MemCube
from memfed.cube.digest import payload_digest
from memfed.cube.fingerprint import check_base_model, fingerprint_model, unwrap_base_model
from memfed.cube.manifest import check_cube_id, new_manifest
from memfed.cube.payload import describe_tensors, dominant_dtype, read_header
from memfed.errors import (
    AlreadyExistsError,
    IncompatibleModelError,
    InvalidArgumentError,
    NotFoundError,
    StorageError,
    UnsupportedError,
)
from memfed.fsio import fsync_dir
from memfed.mip.v1 import cube_pb2

if TYPE_CHECKING:
    import torch

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_LORA_KEY_RE = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")

# PEFT config keys that do not change what a plain LoRA computes at inference (initialisation schemes,
# bookkeeping). Any other key with a non-default value names a feature memfed does not run, and the import
# is refused rather than silently changing the adapter's behaviour.
_INERT_KEYS = frozenset(
    {
        "peft_type", "peft_version", "task_type", "base_model_name_or_path", "revision", "auto_mapping",
        "inference_mode", "r", "lora_alpha", "target_modules", "exclude_modules", "rank_pattern",
        "alpha_pattern", "use_rslora", "fan_in_fan_out", "lora_dropout", "bias", "init_lora_weights",
        "loftq_config", "eva_config", "corda_config", "lora_ga_config", "layers_to_transform",
        "layers_pattern", "megatron_core", "qalora_group_size", "ensure_weight_tying",
    }
)  # fmt: skip
# Initialisations that leave the base weights untouched (EVA only chooses the starting A).
_PLAIN_INITS = (True, False, "gaussian", "eva")
_FEATURE_NAMES = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "modules_to_save": "modules_to_save (fully trained extra modules)",
    "lora_bias": "LoRA bias terms",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "trainable_token_indices": "trainable token embeddings",
    "layer_replication": "layer replication",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_qalora": "QALoRA",
    "megatron_config": "Megatron parallel layers",
}


def read_adapter_config(adapter_dir: Path) -> tuple[dict[str, Any], str]:
    """The folder's adapter_config.json as (parsed, verbatim text); clear errors when absent or bad."""
    config_path = adapter_dir / CONFIG_FILE
    if not adapter_dir.is_dir():
        raise NotFoundError(f"PEFT adapter folder {adapter_dir} does not exist")
    if not config_path.is_file():
        raise InvalidArgumentError(
            f"{adapter_dir} has no {CONFIG_FILE}", hint="point at a folder saved by PeftModel.save_pretrained"
        )
    text = config_path.read_text(encoding="utf-8")
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise InvalidArgumentError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise InvalidArgumentError(f"{config_path} does not hold a JSON object")
    return config, text


def check_supported(config: dict[str, Any]) -> None:
    """Raise UnsupportedError unless ``config`` describes a plain LoRA adapter memfed can run exactly."""
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise UnsupportedError(
            f"PEFT adapter type {config.get('peft_type')!r} is unsupported: "
            "memfed imports LoRA adapters only",
            hint="convert the module to LoRA, or internalize its knowledge from text",
        )
    if config.get("bias", "none") != "none":
        raise UnsupportedError(f"LoRA with bias={config['bias']!r} is unsupported (it trains base biases)")
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        # PiSSA, OLoRA, CorDA and LoftQ move part of the base weights into the adapter during training,
        # so the adapter does not apply to the original base model the fingerprint names.
        raise UnsupportedError(
            f"LoRA initialised with {init!r} is unsupported: that method changes the base weights",
            hint="save the adapter converted to plain LoRA (PEFT's path_initial_model_for_weight_conversion)",
        )
    for key, value in config.items():
        if key in _INERT_KEYS or value in (None, False, {}, [], "", 0):
            continue
        feature = _FEATURE_NAMES.get(key, f"PEFT option {key}={value!r}")
        raise UnsupportedError(
            f"this PEFT LoRA adapter uses {feature}, which is unsupported",
            hint="memfed imports plain LoRA adapters; retrain without that option",
        )


def _pattern_value(patterns: dict[str, Any], module: str, default: float) -> float:
    """Per-module override as PEFT resolves it: the first pattern key matching a suffix of the name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return float(value)
    return float(default)


def lora_scaling(rank: int, alpha: float, use_rslora: bool) -> float:
    """LoRA's output scale: alpha/r, or alpha/sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def _module_shapes(model: torch.nn.Module, module: str) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like layer, or IncompatibleModelError."""
    base = unwrap_base_model(model)
    try:
        layer = base.get_submodule(module)
    except AttributeError as exc:
        raise IncompatibleModelError(
            f"the adapter targets module {module!r}, which the host model does not have",
            hint="import it with --model pointing at the base model it was trained on",
        ) from exc
    if hasattr(layer, "in_features") and hasattr(layer, "out_features"):
        return int(layer.in_features), int(layer.out_features)
    if type(layer).__name__ == "Conv1D":  # GPT-2 style: weight is (in, out)
        return int(layer.weight.shape[0]), int(layer.weight.shape[1])
    raise UnsupportedError(
        f"LoRA on {type(layer).__name__} module {module!r} is unsupported (linear layers only)"
    )


def lora_targets_from_tensors(
    header: dict[str, Any], config: dict[str, Any], model: torch.nn.Module | None
) -> list[cube_pb2.LoraTarget]:
    """One LoraTarget per adapted module, with rank read from the tensors and alpha from the config.

    With a model, each target's shapes are checked against the host layer.
    """
    modules: dict[str, dict[str, list[int]]] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        m = _LORA_KEY_RE.match(key)
        if not m:
            raise UnsupportedError(f"adapter tensor {key!r} is not a LoRA A/B weight; unsupported layer type")
        modules.setdefault(m["module"], {})[m["part"]] = entry["shape"]
    use_rslora = bool(config.get("use_rslora", False))
    targets = []
    for module in sorted(modules):
        parts = modules[module]
        if set(parts) != {"lora_A", "lora_B"}:
            raise InvalidArgumentError(
                f"module {module!r} lacks its {'lora_B' if 'lora_A' in parts else 'lora_A'}"
            )
        if len(parts["lora_A"]) != 2 or len(parts["lora_B"]) != 2:
            raise UnsupportedError(f"module {module!r} has non-matrix LoRA factors (a convolution LoRA)")
        (rank, in_a), (out_b, rank_b) = parts["lora_A"], parts["lora_B"]
        if rank != rank_b:
            raise InvalidArgumentError(f"module {module!r}: lora_A rank {rank} != lora_B rank {rank_b}")
        if model is not None:
            in_f, out_f = _module_shapes(model, module)
            if (in_a, out_b) != (in_f, out_f):
                raise IncompatibleModelError(
                    f"module {module!r}: the adapter maps {in_a}->{out_b} features but the host layer maps "
                    f"{in_f}->{out_f}",
                    hint="import it with --model pointing at the base model it was trained on",
                )
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
        targets.append(
            cube_pb2.LoraTarget(
                module=module, rank=rank, alpha=alpha, scaling=lora_scaling(rank, alpha, use_rslora)
            )
        )
    if not targets:
        raise InvalidArgumentError("the adapter holds no LoRA tensors")
    return targets


def _rename_keys(payload: bytes, strip: str | None, add: str | None) -> bytes:
    """Re-encode a safetensors file with renamed tensors (bit-identical tensor data)."""
    from safetensors.torch import load, save

    tensors = load(payload)
    renamed = {}
    for key, value in tensors.items():
        if strip is not None:
            if not key.startswith(strip):
                raise UnsupportedError(f"adapter tensor {key!r} does not start with PEFT's {strip!r} prefix")
            key = key[len(strip) :]
        renamed[(add or "") + key] = value
    return save(renamed)


def import_peft(
    adapter_dir: str | Path,
    model: torch.nn.Module,
    *,
    cube_id: str | None = None,
    version: str = "1.0.0",
    owner: str = "",
    tags: tuple[str, ...] = (),
    model_name: str | None = None,
) -> MemCube:
    """Turn a PEFT LoRA folder into a cube bound to ``model``'s fingerprint.

    Unsupported adapter types or options raise UnsupportedError; tensors that do not fit the host model
    raise IncompatibleModelError. Nothing is written anywhere: the caller stores the cube.
    """
    adapter_dir = Path(adapter_dir)
    config, config_text = read_adapter_config(adapter_dir)
    check_supported(config)
    weights = adapter_dir / WEIGHTS_FILE
    if not weights.is_file():
        if (adapter_dir / "adapter_model.bin").exists():
            raise UnsupportedError(
                "adapter_model.bin is a pickle file and memfed never loads pickle",
                hint="re-save the adapter with safe_serialization=True (adapter_model.safetensors)",
            )
        raise InvalidArgumentError(f"{adapter_dir} has no {WEIGHTS_FILE}")
    payload = _rename_keys(weights.read_bytes(), strip=PEFT_PREFIX, add=None)
    header = read_header(payload)
    targets = lora_targets_from_tensors(header, config, model)
    suffixes = sorted({t.module.rsplit(".", 1)[-1] for t in targets})
    spec = cube_pb2.LoraSpec(
        rank=int(config.get("r", targets[0].rank)),
        alpha=float(config.get("lora_alpha", targets[0].alpha)),
        target_modules=suffixes,
        targets=targets,
        use_rslora=bool(config.get("use_rslora", False)),
        fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
        dropout=float(config.get("lora_dropout", 0.0) or 0.0),
    )
    tensors = describe_tensors(payload)
    description = cube_pb2.PayloadDescription(
        dtype=dominant_dtype(tensors),
        tensors=tensors,
        lora=spec,
        source_config_json=config_text,
        source_format=f"peft-{config.get('peft_version', 'unknown')}",
    )
    origin = cube_pb2.Origin(
        method="import-peft",
        description=f"imported from the PEFT LoRA adapter folder {adapter_dir.name}",
        sources=[s for s in [config.get("base_model_name_or_path")] if s],
    )
    return MemCube(
        manifest=new_manifest(
            cube_id=check_cube_id(cube_id or _cube_id_from_dir(adapter_dir)),
            version=version,
            kind="lora",
            digest=payload_digest(payload),
            size_bytes=len(payload),
            base_model=fingerprint_model(model, name=model_name),
            payload=description,
            origin=origin,
            owner=owner,
            tags=tags,
        ),
        payload=payload,
    )


def _cube_id_from_dir(adapter_dir: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_.\-]+", "_", adapter_dir.resolve().name).strip("_.-")
    return name or "peft_adapter"


def peft_config_for(cube: MemCube) -> dict[str, Any]:
    """The PEFT adapter_config a cube exports with: the imported one verbatim, or one built from the spec."""
    desc = cube.manifest.payload
    if desc.source_config_json:
        return json.loads(desc.source_config_json)
    spec = desc.lora
    rank_pattern = {t.module: t.rank for t in spec.targets if t.rank != spec.rank}
    alpha_pattern = {t.module: t.alpha for t in spec.targets if t.alpha != spec.alpha}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "target_modules": sorted({t.module for t in spec.targets}),
        "rank_pattern": {re.escape(k): v for k, v in rank_pattern.items()},
        "alpha_pattern": {re.escape(k): v for k, v in alpha_pattern.items()},
        "use_rslora": spec.use_rslora,
        "fan_in_fan_out": spec.fan_in_fan_out,
        "lora_dropout": spec.dropout,
        "bias": "none",
        "inference_mode": True,
        "base_model_name_or_path": cube.manifest.base_model.name,
    }


def export_peft(cube: MemCube, out_dir: str | Path, *, force: bool = False) -> Path:
    """Write ``cube`` as a PEFT folder that ``PeftModel.from_pretrained`` loads unchanged.

    The folder is assembled in a temporary sibling and renamed into place, so a crash never leaves a
    half-written adapter. An existing non-empty ``out_dir`` is refused unless ``force``.
    """
    if cube.manifest.kind != cube_pb2.CUBE_KIND_LORA:
        raise UnsupportedError(f"cube {cube.ref} is not a LoRA cube; only LoRA cubes export to PEFT")
    cube.verify()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidArgumentError(f"{out_dir} is a file, not a folder", hint="name a folder to export into")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise AlreadyExistsError(
            f"{out_dir} exists and is not empty", hint="choose another folder or --force"
        )
    try:
        _write_peft_dir(cube, out_dir)
    except OSError as exc:
        raise StorageError(f"cannot write the PEFT folder {out_dir}: {exc.strerror or exc}") from exc
    return out_dir


def _write_peft_dir(cube: MemCube, out_dir: Path) -> None:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would make the export private to this user
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(peft_config_for(cube), indent=2, sort_keys=True) + "\n")
        (tmp / WEIGHTS_FILE).write_bytes(_rename_keys(cube.payload, strip=None, add=PEFT_PREFIX))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
        fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def attach_to_peft_model(model: torch.nn.Module, cube: MemCube, *, adapter_name: str = "default") -> Any:
    """Check the base model, then wrap ``model`` in a PeftModel running the cube's LoRA.

    The node runtime applies modules without PEFT; this path exists for interchange checks and users who
    want a plain PeftModel.
    """
    from peft import PeftModel

    check_base_model(cube.manifest.base_model, model, what=f"cube {cube.ref}")
    with tempfile.TemporaryDirectory() as tmp:
        export_peft(cube, Path(tmp) / "adapter")
        return PeftModel.from_pretrained(model, Path(tmp) / "adapter", adapter_name=adapter_name)
