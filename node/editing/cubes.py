"""Every edit is a cube: build edit cubes, read them back, and attach them to a model.

Two payload forms, both of kind ``edit``:

- **low-rank** (ROME, MEMIT): LoRA tensor naming (``<module>.lora_A.weight`` = Vᵀ (r×in),
  ``<module>.lora_B.weight`` = U (out×r)) and a LoraSpec in the manifest, so the node runtime runs it like
  a LoRA module (O(1) activation, removed by deactivating, base weights untouched) and PEFT export works;
- **codebook** (GRACE): tensors ``keys``, ``key_len``, ``values``, ``radii``; the layer, the mode and the
  edit records live in the payload's safetensors header (so the digest covers them), and the manifest's
  annotations say it is a codebook and at which layer;
- **scope** (SERAC-style edit memory, ``memfed.node.editing.scope``): the scope classifier's IDF table,
  the edits' subject keys (CSR: ``key_ids``, ``key_weights``, ``key_offsets``) and the records as a
  UTF-8 JSON tensor ``records_utf8``; the threshold and n-gram spec in the header. No weights change: it
  is served by ``ScopedModel``, not attached.

Governance: the manifest's origin records what an edit changed, ``subject: old → new`` per fact, the
method and the layers; a new version of an edit cube names its parent digest in ``version_chain``, so a
lifecycle rollback is a return to an earlier, complete state of the edits.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from memfed.cube.build import lora_cube, tensor_cube
from memfed.cube.core import MemCube
from memfed.cube.manifest import CubeManifest, kind_name, ref_string, validate_manifest
from memfed.cube.payload import read_header, tensor_views
from memfed.errors import InvalidArgumentError, UnsupportedError
from memfed.mip.v1 import cube_pb2
from memfed.node.editing.codebook import Codebook, CodebookHook
from memfed.node.editing.lowrank import LowRankEdit, WeightHandle, apply_to_weights
from memfed.node.editing.scope import EditMemory
from memfed.node.editing.value import EditRequest

FORM_KEY = "memfed.edit.form"  # annotation: "low-rank" or "codebook"
LAYERS_KEY = "memfed.edit.layers"
METHOD_KEY = "memfed.edit.method"
_MAX_SOURCES = 64  # facts listed one by one in the origin; a larger batch is summarized


def change_line(req: EditRequest) -> str:
    """``Veltria: Dralmouth → Quorn`` (what one edit changed, for people reading the origin)."""
    old = req.old_target if req.old_target is not None else "?"
    return f"{req.subject}: {old} → {req.target}"


def edit_origin(
    method: str, requests: Sequence[EditRequest], layers: Sequence[int], **params: Any
) -> cube_pb2.Origin:
    """The origin of an edit cube: method, what changed, where (layers), and the method's settings."""
    changes = [change_line(r) for r in requests]
    shown = "; ".join(changes[:3]) + (f"; and {len(changes) - 3} more" if len(changes) > 3 else "")
    layer_text = ",".join(str(x) for x in layers)
    origin = cube_pb2.Origin(
        method="edit",
        description=f"{method.upper()} edit at layer {layer_text}: {shown}",
    )
    for r, line in zip(requests[:_MAX_SOURCES], changes, strict=False):
        origin.sources.append(f"{r.case_id}: {line}" if r.case_id else line)
    if len(requests) > _MAX_SOURCES:
        origin.sources.append(f"... {len(requests) - _MAX_SOURCES} more facts")
    origin.params.update({"method": method, "layers": layer_text, "facts": str(len(requests))})
    if len(requests) == 1:
        r = requests[0]
        origin.params.update({"subject": r.subject, "prompt": r.prompt, "new": r.target})
        if r.old_target is not None:
            origin.params["old"] = r.old_target
    origin.params.update({k: str(v) for k, v in params.items()})
    return origin


def lowrank_cube(
    model: torch.nn.Module | cube_pb2.BaseModelFingerprint,
    edit: LowRankEdit,
    *,
    cube_id: str,
    method: str,
    requests: Sequence[EditRequest],
    layers: Sequence[int],
    version: str = "1.0.0",
    version_chain: Iterable[str] = (),
    lifecycle: str = "generated",
    owner: str = "",
    tags: Iterable[str] = (),
    params: dict[str, Any] | None = None,
) -> MemCube:
    """An ``edit`` cube holding a low-rank edit in LoRA form (runnable by the node runtime)."""
    origin = edit_origin(method, requests, layers, **(params or {}))
    base = lora_cube(
        model,
        {name: (a.detach().float().cpu(), b.detach().float().cpu()) for name, (a, b) in edit.factors.items()},
        cube_id=cube_id,
        version=version,
        origin=origin,
        lifecycle=lifecycle,
        version_chain=version_chain,
        owner=owner,
        tags=tags,
    )
    m = CubeManifest()
    m.CopyFrom(base.manifest)
    m.kind = cube_pb2.CUBE_KIND_EDIT
    m.annotations.update({FORM_KEY: "low-rank", METHOD_KEY: method, LAYERS_KEY: ",".join(map(str, layers))})
    validate_manifest(m)
    return MemCube(manifest=m, payload=base.payload)


def codebook_cube(
    model: torch.nn.Module | cube_pb2.BaseModelFingerprint,
    codebook: Codebook,
    *,
    cube_id: str,
    version: str = "1.0.0",
    version_chain: Iterable[str] = (),
    lifecycle: str = "generated",
    owner: str = "",
    tags: Iterable[str] = (),
    params: dict[str, Any] | None = None,
) -> MemCube:
    """An ``edit`` cube holding a codebook (see the module docstring)."""
    return _records_cube(
        model, codebook, "codebook", "grace", [codebook.layer],
        {"memfed.edit.module": codebook.module},
        {"entries": codebook.size, "mode": codebook.mode, **(params or {})},
        cube_id=cube_id, version=version, version_chain=version_chain, lifecycle=lifecycle, owner=owner,
        tags=tags,
    )  # fmt: skip


def scope_cube(
    model: torch.nn.Module | cube_pb2.BaseModelFingerprint,
    memory: EditMemory,
    *,
    cube_id: str,
    version: str = "1.0.0",
    version_chain: Iterable[str] = (),
    lifecycle: str = "generated",
    owner: str = "",
    tags: Iterable[str] = (),
) -> MemCube:
    """An ``edit`` cube holding a SERAC-style edit memory (see the module docstring)."""
    return _records_cube(
        model, memory, "scope", "serac", [], {}, {"threshold": memory.threshold},
        cube_id=cube_id, version=version, version_chain=version_chain, lifecycle=lifecycle, owner=owner,
        tags=tags,
    )  # fmt: skip


def _records_cube(
    model: torch.nn.Module | cube_pb2.BaseModelFingerprint,
    holder: Codebook | EditMemory,
    form: str,
    method: str,
    layers: list[int],
    annotations: dict[str, str],
    params: dict[str, Any],
    **cube: Any,
) -> MemCube:
    """An ``edit`` cube whose payload keeps every edit's record (a codebook or an edit memory): the origin
    names the newest edits and how many there are, the annotations the form, method and layers."""
    requests = [EditRequest.from_record(r) for r in holder.records]
    origin = edit_origin(method, requests[-_MAX_SOURCES:], layers, **params)
    origin.params["facts"] = str(len(requests))
    annotations = {
        FORM_KEY: form,
        METHOD_KEY: method,
        LAYERS_KEY: ",".join(map(str, layers)),
        **annotations,
        "memfed.edit.entries": str(holder.size),
    }
    return tensor_cube(model, holder.tensors(), "edit", origin=origin, metadata=holder.metadata(),
                       annotations=annotations, **cube)  # fmt: skip


def edit_form(manifest: CubeManifest) -> str:
    """``"low-rank"``, ``"codebook"`` or ``"scope"``; UnsupportedError for a cube that is not an edit cube."""
    if kind_name(manifest.kind) != "edit":
        raise UnsupportedError(
            f"cube {ref_string(manifest)} is a {kind_name(manifest.kind)} cube, not an edit cube",
            hint="memfed edit works with cubes made by memfed edit apply",
        )
    form = manifest.annotations.get(FORM_KEY)
    if form is None:
        form = "low-rank" if manifest.payload.WhichOneof("spec") == "lora" else "codebook"
    if form not in ("low-rank", "codebook", "scope"):
        raise UnsupportedError(f"edit cube {ref_string(manifest)} has an unknown form {form!r}")
    return form


def read_edit(cube: MemCube) -> LowRankEdit | Codebook | EditMemory:
    """The edit a cube holds: a LowRankEdit (factors, with their LoRA scaling folded in), a Codebook or
    an EditMemory."""
    cube.verify()
    tensors = {k: v.clone() for k, v in tensor_views(cube.payload).items()}
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InvalidArgumentError(f"cube {cube.ref}: tensor {name} holds NaN or Inf values")
    form = edit_form(cube.manifest)
    if form in ("codebook", "scope"):
        meta = read_header(cube.payload).get("__metadata__", {})
        return (Codebook if form == "codebook" else EditMemory).from_parts(tensors, meta)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for target in cube.manifest.payload.lora.targets:
        a = tensors.get(f"{target.module}.lora_A.weight")
        b = tensors.get(f"{target.module}.lora_B.weight")
        if a is None or b is None:
            raise InvalidArgumentError(f"cube {cube.ref}: the payload lacks the factors of {target.module}")
        factors[target.module] = (a.float(), b.float() * float(target.scaling or 1.0))
    if not factors:
        raise InvalidArgumentError(f"edit cube {cube.ref} names no target layers")
    return LowRankEdit(factors)


@dataclass
class AttachedEdit:
    """An edit cube in effect on a model; ``remove`` undoes it (hooks removed, or weights restored)."""

    ref: str
    form: str
    handle: WeightHandle | CodebookHook

    def remove(self) -> None:
        if isinstance(self.handle, CodebookHook):
            self.handle.remove()
        else:
            self.handle.restore()

    def __enter__(self) -> AttachedEdit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def attach(model: torch.nn.Module, cube: MemCube) -> AttachedEdit:
    """Put an edit cube into effect on ``model``, after checking it was made for this model.

    Low-rank edits are written into the weights (O(layer size); ``remove`` restores the saved rows
    exactly). To run them without touching weights, load the cube into the node runtime instead
    (``ModuleRuntime.load``); codebooks always run as a forward hook.
    """
    from memfed.cube.fingerprint import check_base_model

    check_base_model(cube.manifest.base_model, model, what=f"edit cube {cube.ref}")
    edit = read_edit(cube)
    if isinstance(edit, EditMemory):
        raise UnsupportedError(
            f"edit cube {cube.ref} is an edit memory (SERAC-style): it changes no weights and no layer",
            hint="serve it with memfed.node.editing.scope_path.ScopedModel (scoped_answer)",
        )
    if isinstance(edit, Codebook):
        try:
            model.get_submodule(edit.module)
        except AttributeError:
            raise InvalidArgumentError(f"cube {cube.ref}: the model has no layer {edit.module!r}") from None
        return AttachedEdit(cube.ref, "codebook", CodebookHook(model, edit).attach())
    return AttachedEdit(cube.ref, "low-rank", apply_to_weights(model, edit))


def describe_edit(cube: MemCube) -> dict[str, Any]:
    """What an edit cube changed, for people: form, method, layers and one line per fact."""
    m = cube.manifest
    form = edit_form(m)
    changes: list[str]
    if form in ("codebook", "scope"):
        held = read_edit(cube)
        assert isinstance(held, Codebook | EditMemory)
        changes = [
            f"{r['subject']}: {r.get('old_target', '?')} → {r['target']}  ({r['prompt']!r})"
            for r in held.records
        ]
    else:
        changes = list(m.origin.sources)
    return {
        "cube": ref_string(m),
        "form": form,
        "method": m.annotations.get(METHOD_KEY, m.origin.params.get("method", "")),
        "layers": m.annotations.get(LAYERS_KEY, m.origin.params.get("layers", "")),
        "description": m.origin.description,
        "version_chain": list(m.version_chain),
        "changes": changes,
    }
