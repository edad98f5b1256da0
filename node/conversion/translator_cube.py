"""A translator as a cube of kind ``editor``: store it, find the newest for a model, read it back safely.

Why a cube: the translator is parametric memory of the node like any module (signed, stored, versioned,
bound to one base model's fingerprint). Its payload is safetensors only: θ's weights (``net.*``) and the
regularized inverse key statistics it generates with (``c_inv.<layer>``); its config is JSON in the
safetensors header (covered by the digest), and the manifest's annotations name the form. Nothing is
unpickled or executed: a cube that does not have exactly the tensors its config implies is refused.

The first half is what any ``editor`` cube needs (build, read back checked, find the newest for a model);
the MEND fact editor (``node/editing/mend_cube.py``) is stored with the same helpers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

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


def editor_cube(
    fingerprint: cube_pb2.BaseModelFingerprint,
    tensors: dict[str, torch.Tensor],
    *,
    form: str,
    config_key: str,
    config: dict[str, Any],
    cube_id: str,
    version: str,
    origin: cube_pb2.Origin,
    owner: str = "",
    tags: Iterable[str] = (),
    annotations: dict[str, str] | None = None,
) -> MemCube:
    """An ``editor`` cube (a network that writes modules: a translator, a MEND editor) bound to the base
    model it was trained on: ``form`` in the annotations and the header, ``config`` as JSON in the header
    (covered by the digest), the weights as safetensors."""
    metadata = {FORM_KEY: form, config_key: json.dumps(config, sort_keys=True)}
    return tensor_cube(fingerprint, tensors, "editor", cube_id=cube_id, version=version, origin=origin,
                       owner=owner, tags=tags, metadata=metadata,
                       annotations={FORM_KEY: form, **(annotations or {})})  # fmt: skip


def is_editor_form(manifest: cube_pb2.CubeManifest, form: str) -> bool:
    return kind_name(manifest.kind) == "editor" and manifest.annotations.get(FORM_KEY) == form


def read_editor_payload(
    cube: MemCube, model: torch.nn.Module, *, form: str, config_key: str, what: str, hint: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config as a JSON object, tensors) of an editor cube of ``form``, made for ``model``.

    Refuses, with typed errors: a cube of another kind or form (InvalidManifestError), one made for
    another base model (IncompatibleModelError), a payload that does not name its form, a config that is
    not a JSON object, non-finite tensors (InvalidArgumentError). Nothing is unpickled or executed; the
    caller checks the tensors against the shapes its config implies (``check_tensor_shapes``).
    """
    m = cube.manifest
    ref = ref_string(m)
    if not is_editor_form(m, form):
        raise InvalidManifestError(
            f"cube {ref} is a {kind_name(m.kind)} cube of form {m.annotations.get(FORM_KEY, '-')!r}, "
            f"not a {what} ({form})",
            hint=hint,
        )
    cube.verify()
    check_base_model(m.base_model, model, what=f"{what} {ref}")
    meta = read_header(cube.payload).get("__metadata__", {}) or {}
    if meta.get(FORM_KEY) != form:
        raise InvalidArgumentError(f"{what} {ref}: the payload does not say it is a {form}")
    try:
        raw = json.loads(meta.get(config_key, ""))
    except ValueError as exc:
        raise InvalidArgumentError(f"{what} {ref}: its config is not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise InvalidArgumentError(f"{what} {ref}: its config is not a JSON object")
    tensors = {k: v.clone() for k, v in tensor_views(cube.payload).items()}
    return raw, tensors


def check_tensor_shapes(
    tensors: dict[str, torch.Tensor], want: dict[str, tuple[int, ...]], what: str
) -> None:
    """InvalidArgumentError unless ``tensors`` are exactly ``want`` (names and shapes), all finite."""
    have = {k: tuple(v.shape) for k, v in tensors.items()}
    if have != want:
        wrong = sorted(set(have.items()) ^ set(want.items()))[:4]
        raise InvalidArgumentError(
            f"{what}: its tensors do not match its config (first differences: {wrong})",
            hint="the cube is damaged or was made by another memfed; train a new one",
        )
    for name, t in tensors.items():
        if not bool(torch.isfinite(t.float()).all()):
            raise InvalidArgumentError(f"{what}: tensor {name} holds NaN or Inf values")


def newest_editor(store: CubeStore, model: torch.nn.Module, form: str, *, what: str, hint: str) -> MemCube:
    """The newest live editor cube of ``form`` in ``store`` made for ``model``; NotFoundError if none."""
    fid = fingerprint_model(model).fingerprint_id
    found = [
        m
        for m in store.list(states=("generated", "activated", "merged"))
        if is_editor_form(m, form) and m.base_model.fingerprint_id == fid
    ]
    if not found:
        raise NotFoundError(f"no {what} for this model in the store", hint=hint)
    newest = max(found, key=lambda m: (m.created_at.seconds, m.created_at.nanos))
    return store.get(newest.cube_id, newest.version)


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
    origin = cube_pb2.Origin(
        method=METHOD,
        description="parameter translator: document facts -> LoRA factors in one forward pass, trained "
        "end to end on synthetic documents of fresh facts",
        params={k: str(v) for k, v in translator.info.items()},
    )
    layers = ",".join(map(str, translator.config.layers))
    return editor_cube(translator.fingerprint, tensors, form=FORM, config_key=CONFIG_KEY,
                       config=translator.config.to_json_dict(), cube_id=cube_id, version=version,
                       origin=origin, owner=owner, tags=tags,
                       annotations={"memfed.translator.layers": layers})  # fmt: skip


def is_translator(manifest: cube_pb2.CubeManifest) -> bool:
    return is_editor_form(manifest, FORM)


def read_translator(cube: MemCube, model: torch.nn.Module) -> Translator:
    """The translator a cube holds, for ``model``.

    Refuses, with typed errors: a cube that is not a translator (InvalidManifestError), one made for
    another base model (IncompatibleModelError), one whose payload does not match its config: missing,
    extra, misshapen or non-finite tensors, or a malformed config (InvalidArgumentError).
    """
    raw, tensors = read_editor_payload(
        cube, model, form=FORM, config_key=CONFIG_KEY, what="parameter translator",
        hint="train one with: memfed memory translator train",
    )  # fmt: skip
    ref = cube.ref
    config = TranslatorConfig.from_json_dict(raw)
    layout = layout_of(model)
    config.check(layout.num_layers)
    net = TranslatorNet(feature_dim(layout.value_dim), layout.value_dim, len(config.layers), config.hidden)
    want = {f"net.{k}": tuple(v.shape) for k, v in net.state_dict().items()}
    want.update({f"c_inv.{layer}": (layout.key_dim, layout.key_dim) for layer in config.layers})
    check_tensor_shapes(tensors, want, f"translator {ref}")
    net.load_state_dict({k[len("net.") :]: v.float() for k, v in tensors.items() if k.startswith("net.")})
    net.eval()
    device = next(model.parameters()).device
    c_inv = {layer: tensors[f"c_inv.{layer}"].float() for layer in config.layers}
    info = {k: str(v) for k, v in cube.manifest.origin.params.items()}
    info["ref"] = ref
    return Translator(net.to(device), config, c_inv, layout, cube.manifest.base_model, info)


def newest_translator(store: CubeStore, model: torch.nn.Module) -> MemCube:
    """The newest live translator cube in ``store`` made for ``model``; NotFoundError when there is none."""
    return newest_editor(
        store, model, FORM, what="parameter translator",
        hint="train one first: memfed memory translator train",
    )  # fmt: skip
