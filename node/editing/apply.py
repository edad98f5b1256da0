"""Apply edits and store them: the next version of an edit cube holds its parent's edits plus the new ones.

What ``memfed edit apply`` runs. The new edits are computed on the model *as the current version leaves
it* (the parent's codebook attached, or its low-rank update in the weights for the duration), so they
build on earlier edits rather than fight them; the weights are restored before returning.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any

from memfed.cube.fingerprint import check_base_model
from memfed.errors import InvalidArgumentError
from memfed.node.editing.codebook import Codebook
from memfed.node.editing.counterfact import EditCase
from memfed.node.editing.cubes import codebook_cube, lowrank_cube, read_edit, scope_cube
from memfed.node.editing.editor import Editor
from memfed.node.editing.gradfree import gradfree_edit
from memfed.node.editing.lineage import next_version
from memfed.node.editing.lowrank import LowRankEdit, apply_to_weights
from memfed.node.editing.mend import MendEditor
from memfed.node.editing.scope import EditMemory
from memfed.node.editing.value import EditRequest
from memfed.node.store import CubeStore

Single = tuple[str | None, str | None, str | None]
METHODS = ("grace", "rome", "memit", "mend", "gradfree", "serac")


def apply_edits(
    editor: Editor,
    store: CubeStore,
    *,
    method: str,
    default_cube: str,
    single: Single | None = None,
    requests_from: Callable[[], list[EditRequest]] | None = None,
    layer: int | None = None,
    cube_id: str | None = None,
    force: bool = False,
    mend: MendEditor | None = None,
    calibration: Sequence[EditCase] = (),
) -> dict[str, Any]:
    """Make the edits (one request, or ``requests_from()``), store the next cube version, report it.

    ``mend``: the trained editor ``method="mend"`` edits with (checked against the model first: an editor
    trained for another base model is refused with IncompatibleModelError before anything changes).
    ``calibration``: training cases a *new* scoped memory (``method="serac"``) calibrates its subject and
    relation thresholds on (``scope.calibrate_on_cases``); without them it keeps the defaults."""
    if method not in METHODS:
        raise InvalidArgumentError(f"unknown edit method {method!r}", hint=f"use {', '.join(METHODS)}")
    if method == "serac" and layer is not None:
        raise InvalidArgumentError("a scoped (serac) edit changes no layer", hint="leave --layer out")
    if layer is not None:
        editor.check_layer(layer)
    if method == "mend":
        if mend is None:
            raise InvalidArgumentError(
                "the mend method needs a trained editor", hint="memfed edit train-editor"
            )
        mend.check_model(editor.model)
        if layer is not None and layer not in mend.layers:
            raise InvalidArgumentError(
                f"the MEND editor edits layers {list(mend.layers)}, not layer {layer}",
                hint="leave --layer out (the editor's layers are fixed when it is trained)",
            )
    nv = next_version(store, cube_id or default_cube)
    parent = read_edit(nv.parent) if nv.parent is not None else None
    if nv.parent is not None:
        check_base_model(nv.parent.manifest.base_model, editor.model, what=f"edit cube {nv.parent.ref}")
    wants = {"grace": Codebook, "serac": EditMemory}.get(method, LowRankEdit)
    if parent is not None and not isinstance(parent, wants):
        held = {Codebook: "a codebook", EditMemory: "a scoped edit memory"}.get(
            type(parent), "a low-rank edit"
        )
        raise InvalidArgumentError(
            f"cube {nv.parent.ref} holds {held}; a {method} edit cannot be its next version",  # type: ignore[union-attr]
            hint="give another --cube id, or the matching --method",
        )

    def requests() -> list[EditRequest]:
        if requests_from is not None:
            return requests_from()
        prompt, subject, target = single  # type: ignore[misc]
        return [editor.request(prompt or "", subject or "", target or "", force=force)]

    if method == "grace":
        cube, reqs, layers, answers = _codebook(editor, parent, requests, layer, nv)  # type: ignore[arg-type]
    elif method == "serac":
        cube, reqs, layers, answers = _scope(editor, parent, requests, nv, calibration)  # type: ignore[arg-type]
    else:
        cube, reqs, layers, answers = _lowrank(
            editor, parent, requests, layer, nv, method, mend if method == "mend" else None
        )  # type: ignore[arg-type]
    store.put(cube.manifest, cube.payload)
    return {
        "cube": cube.ref,
        "cube_id": cube.manifest.cube_id,
        "version": cube.manifest.version,
        "digest": cube.manifest.digest,
        "parent": nv.parent.ref if nv.parent is not None else None,
        "method": method,
        "layers": ",".join(map(str, layers)),
        "changes": [
            {
                "subject": r.subject,
                "prompt": r.prompt,
                "old": r.old_target,
                "new": r.target,
                "answer_after": a,
            }
            for r, a in zip(reqs, answers, strict=True)
        ],
    }


def _codebook(
    editor: Editor,
    parent: Codebook | None,
    requests: Callable[[], list[EditRequest]],
    layer: int | None,
    nv: Any,
) -> tuple[Any, list[EditRequest], list[int], list[str]]:
    if parent is not None:
        ced = editor.codebook_editor(parent)  # attached first: requests are checked on the edited model
        reqs = requests()
    else:
        reqs = requests()
        ced = editor.codebook_editor(layer=layer, requests=reqs)
    try:
        for req in reqs:
            ced.edit(req)
        answers = [editor.answer(r.prompt) for r in reqs]
    finally:
        ced.hook.remove()
    cube = codebook_cube(
        editor.fingerprint, ced.codebook, cube_id=nv.cube_id, version=nv.version, version_chain=nv.chain,
        lifecycle="activated",
    )  # fmt: skip
    return cube, reqs, [ced.codebook.layer], answers


def _lowrank(
    editor: Editor,
    parent: LowRankEdit | None,
    requests: Callable[[], list[EditRequest]],
    layer: int | None,
    nv: Any,
    method: str,
    mend: MendEditor | None = None,
) -> tuple[Any, list[EditRequest], list[int], list[str]]:
    with ExitStack() as stack:
        if parent is not None:
            stack.enter_context(apply_to_weights(editor.model, parent))
        reqs = requests()
        if layer is None and mend is None:
            layer = editor.choose_layer(reqs, "all")
        new: LowRankEdit | None = None
        layers: Sequence[int]
        if mend is not None:  # all requests in one pass of the editor, on the model the parent leaves
            layers = mend.layers
            new = mend.edit(reqs)
            stack.enter_context(apply_to_weights(editor.model, new))
        elif method == "gradfree":  # forward passes only, each on the model the previous ones left
            layers = [layer]
            for req in reqs:
                edit = gradfree_edit(editor, req, layer).edit
                stack.enter_context(apply_to_weights(editor.model, edit))
                new = edit if new is None else new.concat(edit)
        elif method == "rome":
            layers = [layer]
            for req in reqs:  # one after another, each on the model the previous ones left
                edit = editor.rome(req, layer).edit
                stack.enter_context(apply_to_weights(editor.model, edit))
                new = edit if new is None else new.concat(edit)
        else:
            result = editor.memit(reqs, editor.memit_layers(layer))
            layers = result.layers
            stack.enter_context(apply_to_weights(editor.model, result.edit))
            new = result.edit
        answers = [editor.answer(r.prompt) for r in reqs]
    assert new is not None
    total = new if parent is None else parent.concat(new)
    cube = lowrank_cube(
        editor.fingerprint, total, cube_id=nv.cube_id, method=method, requests=reqs, layers=list(layers),
        version=nv.version, version_chain=nv.chain, lifecycle="activated",
    )  # fmt: skip
    return cube, reqs, list(layers), answers


def _scope(
    editor: Editor,
    parent: EditMemory | None,
    requests: Callable[[], list[EditRequest]],
    nv: Any,
    calibration: Sequence[EditCase],
) -> tuple[Any, list[EditRequest], list[int], list[str]]:
    """The next version of a scoped edit memory: the parent's records plus ``requests`` (no training). A
    new memory takes its thresholds from ``calibration`` (a memory of those cases, thrown away after)."""
    from memfed.node.editing.scope import calibrate_on_cases
    from memfed.node.editing.scope_path import ScopedModel

    model, tokenizer = editor.model, editor.tokenizer
    if parent is None:
        memory = EditMemory()
        if calibration:
            probe = EditMemory()
            calibrate_on_cases(probe, calibration, ScopedModel(model, tokenizer, probe).relate)
            memory.threshold, memory.relation_threshold = probe.threshold, probe.relation_threshold
    else:
        memory = parent
    reqs = requests()
    for req in reqs:
        memory.add(req)
    scoped = ScopedModel(model, tokenizer, memory)
    answers = [scoped.answer(r.prompt) for r in reqs]
    cube = scope_cube(
        editor.fingerprint, memory, cube_id=nv.cube_id, version=nv.version, version_chain=nv.chain,
        lifecycle="activated",
    )  # fmt: skip
    return cube, reqs, [], answers
