"""SERAC-style scoped editing on the embedded model: the edit memory, its scope classifier (subject and
relation gate) and thresholds, the scoped answer path through the Evaluator, and the ``scope`` form of an
edit cube.

Small sizes (the 1,000-edit run is ``memfed bench evolve``, part ``scope``).
"""

from __future__ import annotations

import pytest
import torch

from memfed.errors import InvalidArgumentError, UnsupportedError
from memfed.node.editing.counterfact import SEED, EditCase, load_cases, novel_cases, split_cases
from memfed.node.editing.cubes import attach, describe_edit, read_edit, scope_cube
from memfed.node.editing.evaluate import Evaluator, summarize
from memfed.node.editing.scope import EditMemory, calibrate_on_cases, check_threshold
from memfed.node.editing.scope_path import ScopedModel, scoped_answer
from memfed.node.editing.value import EditRequest


@pytest.fixture(scope="module")
def split() -> tuple[list[EditCase], list[EditCase]]:
    return split_cases(load_cases())


@pytest.fixture(scope="module")
def calibration(frozen_default_model, split) -> tuple[EditMemory, dict[str, float]]:
    """A memory holding 60 train edits (every fourth train case: all relations) and 12 insertions, both
    thresholds calibrated on their prompts, and the figures."""
    memory = EditMemory()
    cases = split[0][::4][:60] + novel_cases(12, seed=SEED + 1)
    return memory, calibrate_on_cases(memory, cases, ScopedModel(*frozen_default_model, memory).relate)


@pytest.fixture(scope="module")
def calibrated(calibration) -> EditMemory:
    return calibration[0]


def _memory_like(calibrated: EditMemory, cases: list[EditCase]) -> EditMemory:
    """A fresh memory with ``calibrated``'s settings holding ``cases``' edits."""
    memory = EditMemory(
        calibrated.embedder, calibrated.threshold, relation_threshold=calibrated.relation_threshold
    )
    for c in cases:
        memory.add(c.request())
    return memory


def _one_case_per_subject(cases: list[EditCase], n: int) -> list[EditCase]:
    """The first case of each of ``n`` subjects that have other facts: those facts stay unedited."""
    first: dict[str, EditCase] = {}
    for c in cases:
        if c.subject_probes:
            first.setdefault(c.subject, c)
    return list(first.values())[:n]


def test_calibration_separates_paraphrases_from_neighbours(calibration) -> None:
    calibrated, figures = calibration
    assert calibrated.size == 72
    assert figures["lowest_positive"] == 1.0  # every paraphrase names its subject verbatim
    assert figures["highest_negative"] < calibrated.threshold < figures["lowest_positive"]
    assert figures["recall"] == 1.0 and figures["false_positive_rate"] == 0.0
    # the relation gate: no other fact of an edited subject reaches it; most paraphrases do
    assert figures["relation_highest_negative"] < calibrated.relation_threshold
    assert figures["relation_false_positive_rate"] == 0.0
    assert figures["relation_recall"] >= 0.75


def test_each_paraphrase_goes_to_its_own_edit_among_a_subjects_edits(
    frozen_default_model, calibrated: EditMemory, split
) -> None:
    """A country with both facts edited (capital, language): every rewrite and paraphrase prompt goes to
    the edit asking its question, never to the subject's other edit (the relation gate picks); a
    neighbour naming no edited subject matches none. (The person relations' held-out questions are where
    the gate errs: the embedded model reads "What does X do for a living?" as asking for an employer.)"""
    by_subject: dict[str, list[EditCase]] = {}
    for c in split[1]:
        by_subject.setdefault(c.subject, []).append(c)
    cases = next(v for v in by_subject.values() if {c.relation for c in v} == {"capital", "language"})
    memory = _memory_like(calibrated, cases)
    relate = ScopedModel(*frozen_default_model, memory).relate
    for i, case in enumerate(cases):
        matches = memory.match_many([case.prompt, *case.paraphrases], relate)
        assert all(m is not None and m.entry == i for m in matches)
        assert matches[0] is not None and matches[0].similarity == pytest.approx(1.0)
    subjects = [c.subject for c in cases]
    outside = [n.prompt for c in cases for n in c.neighbours if not any(s in n.prompt for s in subjects)]
    assert outside and all(m is None for m in memory.match_many(outside, relate))


def test_other_fact_of_an_edited_subject_is_answered_by_the_base_model(
    frozen_default_model, calibrated: EditMemory, split
) -> None:
    """One fact edited per subject: the subject's other facts are out of scope (the relation gate) and
    keep the base model's answers through the Evaluator; with the gate open they would not."""
    model, tokenizer = frozen_default_model
    cases = _one_case_per_subject(split[1], 6)
    stream = cases + novel_cases(4)
    memory = _memory_like(calibrated, stream)
    scoped = ScopedModel(model, tokenizer, memory)
    probes = [n.prompt for c in cases for n in c.subject_probes]
    assert all(m is None for m in memory.match_many(probes, scoped.relate))
    assert all(m is not None for m in memory.match_many(probes))  # the subject alone would admit them
    ev = Evaluator(model, tokenizer, cases)
    edited = [c.subject for c in stream]
    with ev.routed(scoped):
        gated = summarize(ev.score(edited=edited))
    assert gated["subject_locality"] == 1.0 and gated["efficacy"] == 1.0
    base = ScopedModel(model, tokenizer, EditMemory(memory.embedder))
    probe = cases[0].subject_probes[0].prompt
    assert scoped.answer(probe) == base.answer(probe) != cases[0].target_new
    memory.relation_threshold = 0.0  # gate open: only the subject decides
    with ev.routed(ScopedModel(model, tokenizer, memory)):
        ungated = summarize(ev.score(edited=edited))
    assert ungated["subject_locality"] < gated["subject_locality"]


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "0.5", True])
@pytest.mark.parametrize("which", ["threshold", "relation_threshold"])
def test_threshold_outside_unit_interval_is_refused_and_changes_nothing(
    calibrated: EditMemory, which: str, bad
) -> None:
    before = getattr(calibrated, which)
    with pytest.raises(InvalidArgumentError) as err:
        setattr(calibrated, which, bad)
    assert err.value.hint
    assert getattr(calibrated, which) == before
    with pytest.raises(InvalidArgumentError):
        EditMemory(calibrated.embedder, **{which: bad})
    assert check_threshold(0) == 0.0 and check_threshold(1) == 1.0


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, "0.25"])
def test_relation_depth_outside_the_model_is_refused(calibrated: EditMemory, bad) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        EditMemory(calibrated.embedder, relation_depth=bad)
    assert err.value.hint


def test_bad_edits_are_refused_and_change_nothing() -> None:
    memory = EditMemory()
    with pytest.raises(InvalidArgumentError):
        memory.add(EditRequest("The capital of Veltria is", "Sotramar", "Quorn"))
    with pytest.raises(InvalidArgumentError):
        memory.add(EditRequest("The capital of Veltria is", "Veltria", "  "))
    assert memory.size == 0
    memory.add(EditRequest("The capital of Veltria is", "Veltria", "Quorn"))
    memory.add(EditRequest("The capital of Veltria is", "Veltria", "Dralmouth"))  # same fact: replaced
    assert memory.size == 1 and memory.records[0]["target"] == "Dralmouth"


def test_scoped_path_through_the_evaluator(frozen_default_model, calibrated: EditMemory, split) -> None:
    """Test cases plus insertions, scored through the scoped path: the edits take, neighbours keep their
    answers; outside ``routed`` the Evaluator scores the unedited model exactly as before."""
    model, tokenizer = frozen_default_model
    stream = split[1][:8] + novel_cases(4)
    memory = _memory_like(calibrated, stream)
    ev = Evaluator(model, tokenizer, stream)
    edited = [c.subject for c in stream]
    before = summarize(ev.score(edited=edited))
    with ev.routed(ScopedModel(model, tokenizer, memory)):
        scoped = summarize(ev.score(edited=edited))
    after = summarize(ev.score(edited=edited))
    assert before == after
    assert before["efficacy"] <= 0.25
    assert scoped["efficacy"] == 1.0 and scoped["generalization"] >= 0.6
    assert scoped["locality"] == 1.0
    case = split[1][0]
    assert scoped_answer(model, tokenizer, memory, case.paraphrases[0]) == case.target_new
    neighbour = next(n for n in case.neighbours if not any(s in n.prompt for s in edited))
    assert scoped_answer(model, tokenizer, memory, neighbour.prompt) == ScopedModel(
        model, tokenizer, EditMemory(memory.embedder)
    ).answer(neighbour.prompt)


def test_in_context_path_runs_and_keeps_neighbours(
    frozen_default_model, calibrated: EditMemory, split
) -> None:
    model, tokenizer = frozen_default_model
    cases = split[1][:4]
    memory = _memory_like(calibrated, cases)
    ev = Evaluator(model, tokenizer, cases)
    with ev.routed(ScopedModel(model, tokenizer, memory, path="context")):
        scores = summarize(ev.score(edited=[c.subject for c in cases]))
    assert scores["locality"] == 1.0  # neighbours are out of scope: the base model answers them
    assert 0.0 <= scores["efficacy"] <= 1.0
    with pytest.raises(InvalidArgumentError):
        ScopedModel(model, tokenizer, memory, path="lora")  # type: ignore[arg-type]


def test_scope_cube_round_trip(frozen_default_model, calibrated: EditMemory) -> None:
    model, _ = frozen_default_model
    cube = scope_cube(model, calibrated, cube_id="serac-test")
    back = read_edit(cube)
    assert isinstance(back, EditMemory)
    assert back.records == calibrated.records and back.threshold == calibrated.threshold
    assert back.relation_threshold == calibrated.relation_threshold  # the gate's settings travel along
    assert back.relation_depth == calibrated.relation_depth
    prompts = [r["prompt"] for r in calibrated.records[:5]] + ["The capital of Nowhere is"]
    assert torch.equal(back.similarities(prompts), calibrated.similarities(prompts))
    info = describe_edit(cube)
    assert info["form"] == "scope" and len(info["changes"]) == calibrated.size
    with pytest.raises(UnsupportedError) as err:
        attach(model, cube)
    assert "ScopedModel" in (err.value.hint or "")


def test_reloaded_memory_decides_the_same(frozen_default_model, calibrated: EditMemory, split) -> None:
    """Relation gate included: the same prompts get the same matches from the stored cube's memory; a
    memory stored before the gate existed (no relation settings) reads with the gate open."""
    model, tokenizer = frozen_default_model
    back = read_edit(scope_cube(model, calibrated, cube_id="serac-reload"))
    assert isinstance(back, EditMemory)
    cases = [c for c in split[0][::4][:60] if c.subject_probes][:5]
    prompts = [p for c in cases for p in (*c.paraphrases, *(n.prompt for n in c.subject_probes))]
    now = calibrated.match_many(prompts, ScopedModel(model, tokenizer, calibrated).relate)
    later = back.match_many(prompts, ScopedModel(model, tokenizer, back).relate)
    assert [m and m.entry for m in now] == [m and m.entry for m in later]
    assert any(m is None for m in now) and any(m is not None for m in now)
    meta = {k: v for k, v in calibrated.metadata().items() if not k.startswith("relation_")}
    assert EditMemory.from_parts(calibrated.tensors(), meta).relation_threshold == 0.0
