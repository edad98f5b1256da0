"""``memfed bench evolve`` part ``scope``: SERAC-style scoped editing at 1,000 edits, and gradient-free
editing next to ROME. Embedded model, the shipped edit cases split by subject (``split_cases``).

SERAC (``memfed.node.editing.scope``): both thresholds are calibrated on the TRAIN split (memory: the
train cases' edits plus insertions about invented subjects up to 1,000). Subject threshold: rewrite and
paraphrase prompts with their own edit against neighbourhood prompts with every edit of another subject.
Relation threshold: rewrite and paraphrase prompts against the same subject's other facts, both scored
against the edit by the base-model relation gate. Then a fresh memory takes the TEST split's cases plus
``novel_cases`` insertions up to 1,000 (as the GRACE bench's stream), every edit added without training
(``serac_ms_per_edit``), and all 1,000 are scored through the scoped path (``Evaluator.routed``):
efficacy, generalization, locality (neighbours whose subject was not edited), and the scope decision's
precision and recall on the same prompts (``serac_scope_wrong_edit``: paraphrases given another edit of
their subject; ``*_ungated``: the same with the relation threshold at 0, the score only picking among a
subject's edits).

Subject locality needs facts of an edited subject that were *not* edited; in that stream every fact of a
test subject is a case, so it is measured on a second 1,000-edit memory holding one test case per
subject (the rest insertions): the subject's other facts must keep the base model's answers
(``serac_subject_locality_1000``; ``serac_subject_locality_ungated_1000``: the same with the relation gate
open, i.e. the subject classifier alone). The in-context counterfactual path (with and without the
context-faithfulness steering vector) is scored on the test cases with the full memory, for the
comparison the path's docstring states (``serac_context_*`` against ``serac_answer_*``).

Gradient-free (``memfed.node.editing.gradfree``): each test case edited alone on the unedited model at the
traced layer, scored, undone (``protocols.each_alone``), on the same cases and layer as ROME in the mend
part of the same run (``memfed.bench.evolve_mend``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from memfed.node.editing import protocols
from memfed.node.editing.counterfact import SEED, EditCase, load_cases, novel_cases, split_cases
from memfed.node.editing.editor import Editor
from memfed.node.editing.evaluate import Evaluator, summarize
from memfed.node.editing.scope import EditMemory, calibrate_on_cases, timed_add
from memfed.node.editing.scope_path import ScopedModel

SIZES = {  # (quick, full)
    "edits": (60, 1000),  # SERAC memory size at test time (test cases first, then insertions)
    "test": (20, 10_000),  # test cases in the stream (all of them in a full run)
    "context": (10, 113),  # test cases scored through the in-context path
    "single": (6, 113),  # test cases for gradient-free vs ROME
}


def _size(part: str, quick: bool) -> int:
    return SIZES[part][0 if quick else 1]


def _stream(cases: Sequence[EditCase], total: int, seed: int) -> list[EditCase]:
    """``cases`` then insertions about invented subjects up to ``total`` edits."""
    cases = list(cases)[:total]
    return cases + novel_cases(max(0, total - len(cases)), seed=seed)


def scope_quality(scoped: ScopedModel, cases: Sequence[EditCase]) -> dict[str, float]:
    """Precision and recall of the scope decision over the stream's prompts: a rewrite or paraphrase
    prompt should match its own edit; a neighbourhood prompt naming no edited subject should match none."""
    memory = scoped.memory
    subjects = {c.subject for c in cases}
    pos = [(p, c.case_id) for c in cases for p in (c.prompt, *c.paraphrases)]
    neg = sorted({n.prompt for c in cases for n in c.neighbours if not any(s in n.prompt for s in subjects)})
    pos_matches = memory.match_many([p for p, _ in pos], scoped.relate)
    neg_matches = memory.match_many(neg, scoped.relate)
    right = sum(
        m is not None and m.record.get("case_id") == cid for m, (_, cid) in zip(pos_matches, pos, strict=True)
    )
    matched = sum(m is not None for m in pos_matches)
    claimed = matched + sum(m is not None for m in neg_matches)
    return {
        "precision": round(right / claimed, 4) if claimed else 1.0,
        "recall": round(right / len(pos), 4),
        "wrong_edit": float(matched - right),
        "false_positives": float(sum(m is not None for m in neg_matches)),
        "negatives": float(len(neg)),
    }


def subject_locality(
    model: torch.nn.Module, tokenizer: Any, memory: EditMemory, cases: Sequence[EditCase], total: int
) -> dict[str, float]:
    """Subject locality at ``total`` edits: one case per subject of ``cases`` (its other facts left
    unedited) plus insertions, scored through the scoped path with the relation gate as calibrated and
    open (threshold 0); and the share of the other-fact prompts the gate lets into scope."""
    first: dict[str, EditCase] = {}
    for c in cases:
        if c.subject_probes:
            first.setdefault(c.subject, c)
    one = list(first.values())[:total]
    stream = _stream(one, total, seed=SEED + 2)
    held = EditMemory(memory.embedder, memory.threshold, relation_depth=memory.relation_depth)
    for c in stream:
        held.add(c.request())
    ev = Evaluator(model, tokenizer, one)
    edited = [c.subject for c in stream]
    out: dict[str, float] = {"cases": float(len(one))}
    for tag, threshold in (("gated", memory.relation_threshold), ("ungated", 0.0)):
        held.relation_threshold = threshold
        scoped = ScopedModel(model, tokenizer, held)
        with ev.routed(scoped):
            out[tag] = summarize(ev.score(edited=edited)).get("subject_locality", 1.0)
        probes = [n.prompt for c in one for n in c.subject_probes]
        inside = sum(m is not None for m in held.match_many(probes, scoped.relate))
        out[f"{tag}_in_scope"] = round(inside / max(1, len(probes)), 4)
    return out


def run_part(quick: bool) -> dict[str, float]:
    from memfed.node.models import default_model_dir, load_host_model

    model, tokenizer = load_host_model(default_model_dir())
    for p in model.parameters():
        p.requires_grad_(False)
    train, test = split_cases(load_cases())
    total = _size("edits", quick)
    out: dict[str, float] = {}

    # -- SERAC: calibrate on TRAIN, score 1,000 edits on TEST ------------------------------------------
    calibration = EditMemory()
    calib = calibrate_on_cases(
        calibration, _stream(train, total, seed=SEED + 1), ScopedModel(model, tokenizer, calibration).relate
    )
    out.update({f"serac_calibration_{k}": v for k, v in calib.items() if not k.endswith("threshold")})
    stream = _stream(test[: _size("test", quick)], total, seed=SEED)
    memory = EditMemory(
        calibration.embedder, calibration.threshold, relation_threshold=calibration.relation_threshold
    )
    out["serac_ms_per_edit"] = round(timed_add(memory, [c.request() for c in stream]), 3)
    scoped = ScopedModel(model, tokenizer, memory)
    quality = scope_quality(scoped, stream)
    memory.relation_threshold = 0.0  # the same decision with the gate open: the relation score only picks
    ungated = scope_quality(ScopedModel(model, tokenizer, memory), stream)
    memory.relation_threshold = calibration.relation_threshold
    ev = Evaluator(model, tokenizer, stream)
    edited = [c.subject for c in stream]
    with ev.routed(scoped):
        serac = summarize(ev.score(edited=edited))
    subject = subject_locality(model, tokenizer, memory, test[: _size("test", quick)], total)
    out.update(
        serac_efficacy_1000=serac["efficacy"],
        serac_generalization_1000=serac.get("generalization", 0.0),
        serac_locality_1000=serac.get("locality", 1.0),
        serac_subject_locality_1000=subject["gated"],
        serac_subject_locality_ungated_1000=subject["ungated"],
        serac_other_facts_in_scope=subject["gated_in_scope"],
        serac_other_facts_in_scope_ungated=subject["ungated_in_scope"],
        serac_subject_locality_cases=subject["cases"],
        serac_scope_precision=quality["precision"],
        serac_scope_recall=quality["recall"],
        serac_scope_wrong_edit=quality["wrong_edit"],
        serac_scope_wrong_edit_ungated=ungated["wrong_edit"],
        serac_scope_recall_ungated=ungated["recall"],
        serac_scope_false_positives=quality["false_positives"],
        serac_threshold=memory.threshold,
        serac_relation_threshold=memory.relation_threshold,
        serac_edits=float(memory.size),
    )

    # -- the in-context counterfactual path, same memory, on test cases --------------------------------
    from memfed.node.conversion.steering import context_pairs, extract

    some = [c for c in stream if c in test][: _size("context", quick)]
    steering, _ = extract(model, tokenizer, context_pairs("train"))
    for tag, vector in (("context", None), ("context_steered", steering)):
        path = ScopedModel(model, tokenizer, memory, path="context", steering=vector)
        with ev.routed(path):
            s = summarize(ev.score(some, edited=edited))
        out.update({f"serac_{tag}_{k}": s.get(k, 0.0) for k in ("efficacy", "generalization", "locality")})
    with ev.routed(ScopedModel(model, tokenizer, memory)):
        s = summarize(ev.score(some, edited=edited))
    out.update({f"serac_answer_{k}": s.get(k, 0.0) for k in ("efficacy", "generalization", "locality")})

    # -- gradient-free, on the test cases ROME runs on in the mend part (memfed.bench.evolve_mend) -----
    editor = Editor(model, tokenizer)
    single = test[: _size("single", quick)]
    layer = editor.choose_layer([c.request() for c in single[:4]], "all")
    gf = protocols.gradfree_edits(editor, single, layer)
    out.update({f"gradfree_{k}": gf.get(k, 0.0) for k in ("efficacy", "generalization", "locality")})
    out["gradfree_ms_per_edit"] = round(gf["seconds_per_edit"] * 1000.0, 1)
    out["gradfree_cases"] = float(len(single))
    out["gradfree_layer"] = float(layer)
    return out
