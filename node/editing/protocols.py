"""Evaluation protocols: how each method is run over a set of cases before it is scored.

- ``each_alone``: every case edited alone on the unedited model, scored, undone: ``single_edits`` (ROME),
  ``gradfree_edits`` and ``mend_edits`` run it;
- ``batch_edit`` (MEMIT): all cases as one edit; neighbours that are in the batch are not locality;
- ``sequential_codebook`` (GRACE): all cases one after another into one codebook, scored after the last;
- ``mend_batch``: a trained MEND editor on all cases in one call (MEMIT's protocol);
- ``finetune_edits``: the baseline, a LoRA trained on each fact alone;
- ``unedited``: the model as it is (what the measures read with no edit).

``memfed edit eval`` and ``memfed bench edit`` both run these, so the CLI reports what the bench does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from memfed.errors import InvalidArgumentError
from memfed.node.editing.counterfact import EditCase
from memfed.node.editing.editor import Editor
from memfed.node.editing.evaluate import CaseScore, Evaluator, fluency_before, summarize
from memfed.node.editing.finetune import finetuned
from memfed.node.editing.gradfree import gradfree_edit
from memfed.node.editing.keys import context_prefixes
from memfed.node.editing.lowrank import LowRankEdit, apply_to_weights
from memfed.node.editing.mend import MendEditor
from memfed.node.editing.value import EditRequest


def _request(case: EditCase, ev: Evaluator) -> Any:
    """The case's edit request, naming the answer it replaces (the unedited model's, if unknown)."""
    req = case.request()
    return req if req.old_target is not None else replace(req, old_target=ev.true_target(case))


def unedited(editor: Editor, cases: Sequence[EditCase]) -> dict[str, float]:
    return summarize(Evaluator(editor.model, editor.tokenizer, cases).score())


def each_alone(
    model: torch.nn.Module,
    tokenizer: Any,
    cases: Sequence[EditCase],
    make_edit: Callable[[EditRequest], LowRankEdit],
    *,
    fluency: bool = False,
) -> dict[str, float]:
    """Every case edited alone on the unedited model by ``make_edit``, scored, undone: the protocol of
    ROME, MEND and gradient-free edits. Adds ``seconds_per_edit`` (the edit's computation, not scoring)
    and, with ``fluency``, ``fluency_before``."""
    ev = Evaluator(model, tokenizer, cases, fluency=fluency)
    scores: list[CaseScore] = []
    seconds = 0.0
    for case in cases:
        t0 = time.perf_counter()
        edit = make_edit(_request(case, ev))
        seconds += time.perf_counter() - t0
        with apply_to_weights(model, edit):
            scores.extend(ev.score([case]))
    summary = summarize(scores)
    before = fluency_before(ev, cases)
    if before is not None:
        summary["fluency_before"] = before
    summary["seconds_per_edit"] = round(seconds / max(1, len(cases)), 5)
    return summary


def single_edits(
    editor: Editor, cases: Sequence[EditCase], layer: int, *, token: str = "all", fluency: bool = False
) -> dict[str, float]:
    """ROME on each case alone (``each_alone``)."""
    return each_alone(
        editor.model,
        editor.tokenizer,
        cases,
        lambda r: editor.rome(r, layer, token=token).edit,
        fluency=fluency,
    )


def gradfree_edits(editor: Editor, cases: Sequence[EditCase], layer: int) -> dict[str, float]:
    """The gradient-free edit on each case alone (``each_alone``)."""
    return each_alone(editor.model, editor.tokenizer, cases, lambda r: gradfree_edit(editor, r, layer).edit)


def batch_edit(editor: Editor, cases: Sequence[EditCase], layer: int) -> dict[str, float]:
    """MEMIT on all cases at once over ``editor.memit_layers(layer)``; adds ``seconds``, ``rank``."""
    ev = Evaluator(editor.model, editor.tokenizer, cases)
    t0 = time.perf_counter()
    result = editor.memit([_request(c, ev) for c in cases], editor.memit_layers(layer))
    seconds = time.perf_counter() - t0
    with apply_to_weights(editor.model, result.edit):
        summary = summarize(ev.score(edited=[c.subject for c in cases]))
    summary.update(seconds=round(seconds, 3), rank=float(result.edit.rank), layers=float(len(result.layers)))
    return summary


def sequential_codebook(
    editor: Editor,
    cases: Sequence[EditCase],
    layer: int,
    *,
    untouched: Sequence[EditCase] = (),
    checkpoints: Sequence[int] = (),
) -> dict[str, float]:
    """GRACE: every case into one codebook, in order, then all scored. ``untouched``: cases whose
    neighbours' answers must stay (their ``locality`` becomes ``untouched_facts_unchanged``).
    ``checkpoints``: after that many edits, the cases edited so far are scored too (keys
    ``at{n}_efficacy`` ...; scoring time is not edit time): how the metrics move as edits accumulate."""
    ev = Evaluator(editor.model, editor.tokenizer, cases)
    probe = Evaluator(editor.model, editor.tokenizer, untouched) if untouched else None
    requests = [_request(c, ev) for c in cases]
    codebook_editor = editor.codebook_editor(layer=layer)
    stops = sorted({n for n in checkpoints if 0 < n < len(cases)})
    at: dict[str, float] = {}
    try:
        seconds, merged, done = 0.0, 0, 0
        for stop in [*stops, len(cases)]:
            t0 = time.perf_counter()
            merged += sum(codebook_editor.edit(req).merged for req in requests[done:stop])
            seconds += time.perf_counter() - t0
            done = stop
            if stop < len(cases):
                so_far = cases[:stop]
                part = summarize(ev.score(so_far, edited=[c.subject for c in so_far]))
                at.update({f"at{stop}_{k}": v for k, v in part.items() if k != "cases"})
        t1 = time.perf_counter()
        summary = summarize(ev.score(edited=[c.subject for c in cases]))
        if probe is not None:
            summary["untouched_facts_unchanged"] = summarize(probe.score()).get("locality", 1.0)
        eval_seconds = time.perf_counter() - t1
    finally:
        codebook_editor.hook.remove()
    summary.update(
        edits=float(len(cases)),
        entries=float(codebook_editor.codebook.size),
        merged=float(merged),
        seconds_per_edit=round(seconds / max(1, len(cases)), 4),
        eval_seconds=round(eval_seconds, 2),
    )
    summary.update(at)
    return summary


def mend_edits(mend: MendEditor, cases: Sequence[EditCase]) -> dict[str, float]:
    """The MEND editor on each case alone (``each_alone``): one forward/backward and one pass of the editor
    per edit (the context prefixes are sampled once per model, before the clock starts)."""
    model, tokenizer = mend.layout.model, mend.tokenizer
    context_prefixes(model, tokenizer)
    return each_alone(model, tokenizer, cases, lambda r: mend.edit([r]))


def mend_batch(mend: MendEditor, cases: Sequence[EditCase]) -> dict[str, float]:
    """The MEND editor on all cases in one call (the sum of their updates), scored like ``batch_edit``;
    adds ``seconds`` and ``rank``."""
    model, tokenizer = mend.layout.model, mend.tokenizer
    ev = Evaluator(model, tokenizer, cases)
    context_prefixes(model, tokenizer)
    t0 = time.perf_counter()
    edit = mend.edit([_request(c, ev) for c in cases])
    seconds = time.perf_counter() - t0
    with apply_to_weights(model, edit):
        summary = summarize(ev.score(edited=[c.subject for c in cases]))
    summary.update(seconds=round(seconds, 4), rank=float(edit.rank))
    return summary


def finetune_edits(editor: Editor, cases: Sequence[EditCase]) -> dict[str, float]:
    """The baseline: a PEFT LoRA trained on each case alone; adds ``seconds_per_edit``."""
    ev = Evaluator(editor.model, editor.tokenizer, cases)
    scores: list[CaseScore] = []
    seconds = 0.0
    for case in cases:
        t0 = time.perf_counter()
        with finetuned(editor.model, editor.tokenizer, _request(case, ev)):
            seconds += time.perf_counter() - t0
            scores.extend(ev.score([case]))
    summary = summarize(scores)
    summary["seconds_per_edit"] = round(seconds / max(1, len(cases)), 4)
    return summary


def evaluate_method(
    editor: Editor,
    cases: Sequence[EditCase],
    method: str,
    *,
    layer: int | None = None,
    mend: MendEditor | None = None,
) -> dict[str, Any]:
    """Run ``method`` (rome, memit, grace, mend, finetune or none) over ``cases`` and summarize the scores.
    ``mend``: the trained editor the mend method uses (each case edited alone)."""
    if not cases:
        raise InvalidArgumentError("no cases to evaluate")
    if method == "none":
        return {"method": method, **unedited(editor, cases)}
    if method == "mend":
        if mend is None:
            raise InvalidArgumentError(
                "the mend method needs a trained editor", hint="memfed edit train-editor"
            )
        mend.check_model(editor.model)
        return {"method": method, "layer": ",".join(map(str, mend.layers)), **mend_edits(mend, cases)}
    if layer is None:
        layer = editor.choose_layer([c.request() for c in cases[:4]], "all")
    editor.check_layer(layer)
    runs = {
        "rome": lambda: single_edits(editor, cases, layer),
        "gradfree": lambda: gradfree_edits(editor, cases, layer),
        "memit": lambda: batch_edit(editor, cases, layer),
        "grace": lambda: sequential_codebook(editor, cases, layer),
        "finetune": lambda: finetune_edits(editor, cases),
    }
    if method not in runs:
        raise InvalidArgumentError(
            f"unknown method {method!r}", hint=f"use one of: {', '.join([*runs, 'mend', 'none'])}"
        )
    return {"method": method, "layer": layer, **runs[method]()}
