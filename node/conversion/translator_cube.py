"""A translator as a cube of kind ``editor``: store it, find the newest for a model, read it back safely.

Why a cube: the translator is parametric memory of the node like any module (signed, stored, versioned,
bound to one base model's fingerprint). Its payload is safetensors only: θ's weights (``net.*``) and the
regularized inverse key statistics it generates with (``c_inv.<layer>``); its config is JSON in the
safetensors header (covered by the digest), and the manifest's annotations name the form. Nothing is
unpickled or executed: a cube that does not have exactly the tensors its config implies is refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from memfed.cube.build import tensor_cube
from memfed.cube.core import MemCube
from memfed.cube.fingerprint import check_base_model, fingerprint_model
from memfed.cube.manifest import kind_name, ref_string
from memfed.cube.payload import read_header, tensor_views
from memfed.errors import InvalidArgumentError, InvalidManifestError, NotFoundError
from memfed.mip.v1 import cube_pb2
from memfed.node.conversion.translator import FORM, TranslatorConfig, TranslatorNet, feature_dim
from memfed.node.conversion.translator_train import Translator
from memfed.node.editing.arch import layout_of

if TYPE_CHECKING:
    from memfed.node.store import CubeStore

FORM_KEY = "memfed.editor.form"  # annotation and header key: FORM
CONFIG_KEY = "memfed.translator.config"  # header: the TranslatorConfig as JSON
METHOD = "translator-train"
DEFAULT_CUBE_ID = "translator"


def translator_cube(
    translator: Translator,
    *,
    cube_id: str = DEFAULT_CUBE_ID,
    version: str = "1.0.0",
    owner: str = "",
    tags: Iterable[str] = ("translator",),
) -> MemCube:
    """The translator as an ``editor`` cube bound to the base model it was trained on."""
    tensors = {f"net.{k}": v.detach().float().cpu() for k, v in translator.net.state_dict().items()}
    tensors.update({f"c_inv.{layer}": c.float().cpu() for layer, c in translator.c_inv.items()})
    metadata = {FORM_KEY: FORM, CONFIG_KEY: json.dumps(translator.config.to_json_dict(), sort_keys=True)}
    origin = cube_pb2.Origin(
        method=METHOD,
        description="parameter translator: document facts -> LoRA factors in one forward pass, trained "
        "end to end on synthetic documents of fresh facts",
        params={k: str(v) for k, v in translator.info.items()},
    )
    annotations = {FORM_KEY: FORM, "memfed.translator.layers": ",".join(map(str, translator.config.layers))}
    return tensor_cube(translator.fingerprint, tensors, "editor", cube_id=cube_id, version=version,
                       origin=origin, owner=owner, tags=tags, metadata=metadata,
                       annotations=annotations)  # fmt: skip


def is_translator(manifest: cube_pb2.CubeManifest) -> bool:
    return kind_name(manifest.kind) == "editor" and manifest.annotations.get(FORM_KEY) == FORM


def read_translator(cube: MemCube, model: torch.nn.Module) -> Translator:
    """The translator a cube holds, for ``model``.

    Refuses, with typed errors: a cube that is not a translator (InvalidManifestError), one made for
    another base model (IncompatibleModelError), one whose payload does not match its config: missing,
    extra, misshapen or non-finite tensors, or a malformed config (InvalidArgumentError).
    """
    m = cube.manifest
    ref = ref_string(m)
    if not is_translator(m):
        raise InvalidManifestError(
            f"cube {ref} is a {kind_name(m.kind)} cube of form {m.annotations.get(FORM_KEY, '-')!r}, "
            f"not a parameter translator ({FORM})",
            hint="train one with: memfed memory translator train",
        )
    cube.verify()
    check_base_model(m.base_model, model, what=f"translator {ref}")
    meta = read_header(cube.payload).get("__metadata__", {}) or {}
    if meta.get(FORM_KEY) != FORM:
        raise InvalidArgumentError(f"translator {ref}: the payload does not say it is a {FORM}")
    try:
        raw = json.loads(meta.get(CONFIG_KEY, ""))
    except ValueError as exc:
        raise InvalidArgumentError(f"translator {ref}: its config is not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise InvalidArgumentError(f"translator {ref}: its config is not a JSON object")
    config = TranslatorConfig.from_json_dict(raw)
    layout = layout_of(model)
    config.check(layout.num_layers)
    tensors = {k: v.clone() for k, v in tensor_views(cube.payload).items()}
    net = TranslatorNet(feature_dim(layout.value_dim), layout.value_dim, len(config.layers), config.hidden)
    want = {f"net.{k}": tuple(v.shape) for k, v in net.state_dict().items()}
    want.update({f"c_inv.{layer}": (layout.key_dim, layout.key_dim) for layer in config.layers})
    have = {k: tuple(v.shape) for k, v in tensors.items()}
    if have != want:
        wrong = sorted(set(have.items()) ^ set(want.items()))[:4]
        raise InvalidArgumentError(
            f"translator {ref}: its tensors do not match its config (first differences: {wrong})",
            hint="the cube is damaged or was made by another memfed; train a new one",
        )
    for name, t in tensors.items():
        if not bool(torch.isfinite(t.float()).all()):
            raise InvalidArgumentError(f"translator {ref}: tensor {name} holds NaN or Inf values")
    net.load_state_dict({k[len("net.") :]: v.float() for k, v in tensors.items() if k.startswith("net.")})
    net.eval()
    device = next(model.parameters()).device
    c_inv = {layer: tensors[f"c_inv.{layer}"].float() for layer in config.layers}
    info = {k: str(v) for k, v in m.origin.params.items()}
    info["ref"] = ref
    return Translator(net.to(device), config, c_inv, layout, m.base_model, info)


def newest_translator(store: CubeStore, model: torch.nn.Module) -> MemCube:
    """The newest live translator cube in ``store`` made for ``model``; NotFoundError when there is none."""
    fid = fingerprint_model(model).fingerprint_id
    found = [
        m
        for m in store.list(states=("generated", "activated", "merged"))
        if is_translator(m) and m.base_model.fingerprint_id == fid
    ]
    if not found:
        raise NotFoundError(
            "no parameter translator for this model in the store",
            hint="train one first: memfed memory translator train",
        )
    newest = max(found, key=lambda m: (m.created_at.seconds, m.created_at.nanos))
    return store.get(newest.cube_id, newest.version)
