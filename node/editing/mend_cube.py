"""A MEND editor as a cube of kind ``editor``: store it, find the newest for a model, read it back safely.

Why a cube: the editor is learned knowledge about *one* base model (how that model's gradients become
updates), so like any module it is stored, versioned and bound to the model's fingerprint; an editor read
for another model is refused (IncompatibleModelError) before anything is edited. The payload is
safetensors only: each layer's network (``net.<layer>.*``, its input statistics included) and the
regularized C⁻¹ it edits with (``c_inv.<layer>``); the config is JSON in the header. The storage and the
checks are the ones the parameter translator uses (``conversion/translator_cube``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from memfed.cube.core import MemCube
from memfed.mip.v1 import cube_pb2
from memfed.node.conversion.translator_cube import (
    check_tensor_shapes,
    editor_cube,
    newest_editor,
    read_editor_payload,
)
from memfed.node.editing.arch import layout_of
from memfed.node.editing.mend import FORM, MendConfig, MendEditor, MendNet

if TYPE_CHECKING:
    from memfed.node.store import CubeStore

CONFIG_KEY = "memfed.mend.config"  # header: the MendConfig as JSON
METHOD = "mend-train"
DEFAULT_CUBE_ID = "mend-editor"
_WHAT = "MEND editor"
_HINT = "train one with: memfed edit train-editor"


def mend_cube(
    editor: MendEditor,
    *,
    cube_id: str = DEFAULT_CUBE_ID,
    version: str = "1.0.0",
    owner: str = "",
    tags: Iterable[str] = ("mend",),
) -> MemCube:
    """The editor as an ``editor`` cube bound to the base model it was trained on."""
    tensors = {
        f"net.{layer}.{k}": v.detach().float().cpu()
        for layer, net in editor.nets.items()
        for k, v in net.state_dict().items()
    }
    tensors.update({f"c_inv.{layer}": c.float().cpu() for layer, c in editor.c_inv.items()})
    origin = cube_pb2.Origin(
        method=METHOD,
        description="MEND fact editor: one edit's gradient at the subject -> a weight update in one pass, "
        "trained on the train split of the model's own edit cases",
        params={k: str(v) for k, v in editor.info.items() if k != "ref"},
    )
    return editor_cube(editor.fingerprint, tensors, form=FORM, config_key=CONFIG_KEY,
                       config=editor.config.to_json_dict(), cube_id=cube_id, version=version, origin=origin,
                       owner=owner, tags=tags,
                       annotations={"memfed.mend.layers": ",".join(map(str, editor.layers))})  # fmt: skip


def read_mend(cube: MemCube, model: torch.nn.Module, tokenizer: Any) -> MendEditor:
    """The editor a cube holds, for ``model``.

    Refuses, with typed errors: a cube that is not a MEND editor (InvalidManifestError), one made for
    another base model (IncompatibleModelError), a payload that does not match its config: missing, extra,
    misshapen or non-finite tensors, or a malformed config (InvalidArgumentError).
    """
    raw, tensors = read_editor_payload(cube, model, form=FORM, config_key=CONFIG_KEY, what=_WHAT, hint=_HINT)
    config = MendConfig.from_json_dict(raw)
    layout = layout_of(model)
    config.check(layout.num_layers)
    nets = {
        layer: MendNet(layout.key_dim, layout.value_dim, config.rank, config.key_side, config.init_lr)
        for layer in config.layers
    }
    want = {
        f"net.{layer}.{k}": tuple(v.shape) for layer, net in nets.items() for k, v in net.state_dict().items()
    }
    want.update({f"c_inv.{layer}": (layout.key_dim, layout.key_dim) for layer in config.layers})
    check_tensor_shapes(tensors, want, f"{_WHAT} {cube.ref}")
    device = next(model.parameters()).device
    for layer, net in nets.items():
        prefix = f"net.{layer}."
        net.load_state_dict({k[len(prefix) :]: v.float() for k, v in tensors.items() if k.startswith(prefix)})
        net.eval().to(device)
    c_inv = {layer: tensors[f"c_inv.{layer}"].float() for layer in config.layers}
    info = {k: str(v) for k, v in cube.manifest.origin.params.items()}
    info["ref"] = cube.ref
    return MendEditor(nets, config, c_inv, layout, tokenizer, cube.manifest.base_model, info)


def newest_mend(store: CubeStore, model: torch.nn.Module) -> MemCube:
    """The newest live MEND editor cube in ``store`` made for ``model``; NotFoundError when there is none."""
    return newest_editor(store, model, FORM, what=_WHAT, hint=_HINT)
