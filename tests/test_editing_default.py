"""Editing the embedded default model: the methods work on facts it knows, the harness scores them, and a
lifecycle rollback of an edit cube restores the model's answers exactly.

Small numbers of edits (the 1,000-edit run is ``memfed bench edit``). The key statistics use a sixth of
the default corpus, in memory, so no test writes a cache into the user's home.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from memfed.errors import InvalidArgumentError
from memfed.node.editing import protocols
from memfed.node.editing.apply import apply_edits
from memfed.node.editing.counterfact import load_cases
from memfed.node.editing.cubes import attach, describe_edit
from memfed.node.editing.editor import Editor
from memfed.node.editing.lineage import attach_current, current_cube
from memfed.node.editing.trace import causal_trace
from memfed.node.editing.value import ValueConfig, optimize_values
from memfed.node.lifecycle import Lifecycle
from memfed.node.runtime import ModuleRuntime
from memfed.node.store import CubeStore


@pytest.fixture(scope="module")
def cases():
    all_cases = load_cases()
    return [all_cases[i] for i in (0, 57, 123, 201, 333)]


def _logits(editor: Editor, prompts: list[str]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [
            editor.model(input_ids=torch.tensor([editor.tokenizer(p)["input_ids"]])).logits[0, -1]
            for p in prompts
        ]


def test_trace_locates_the_fact_in_the_first_mlp(editor: Editor) -> None:
    trace = causal_trace(
        editor.model, editor.tokenizer, "The capital of Stadeirnia is", "Stadeirnia", samples=2
    )
    assert trace.answer == "Vobolport" and trace.p_clean > 0.9 > 0.2 > trace.p_corrupt
    assert trace.best_layer("mlp", "all") == 0
    assert trace.tokens[trace.subject_range[1]].strip() == "Stadeirnia"


def test_rome_single_edits(editor: Editor, cases: list) -> None:
    summary = protocols.single_edits(editor, cases[:3], layer=0)
    assert summary["efficacy"] == 1.0
    assert summary["generalization"] >= 0.66
    # 18 neighbours; with statistics from a sixth of the corpus (for speed) 4 of them change here, 3 with
    # the full corpus. Locality proper is the bench's, over 200 cases.
    assert summary["locality"] >= 0.75


def test_values_of_a_batch_equal_values_optimized_alone(editor: Editor, cases: list) -> None:
    """Each δ stops once its own request is solved (here after 4 and 12 steps), so a batch gives every
    request the δ it would get alone: a solved request is not pushed on while a slower one converges."""
    layout, module = editor.layout, editor.layout.down(0)
    requests = [c.request() for c in cases[:2]]
    config = ValueConfig(steps=20, stop_nll=0.5)
    prefixes = ["", "Also. "]
    batch = optimize_values(layout, editor.tokenizer, module, requests, prefixes, config, token="all")
    steps = []
    for i, request in enumerate(requests):
        alone = optimize_values(layout, editor.tokenizer, module, [request], prefixes, config, token="all")
        steps.append(alone.steps)
        torch.testing.assert_close(batch.delta[i], alone.delta[0], rtol=1e-3, atol=1e-3)
    assert len(set(steps)) == 2 and batch.steps == max(steps)
    assert float(batch.nll.max()) < 0.5


def test_memit_batch_and_codebook_sequence(editor: Editor, cases: list) -> None:
    memit = protocols.batch_edit(editor, cases[:4], layer=0)
    assert memit["efficacy"] >= 0.75 and memit["layers"] == 2.0
    seq = protocols.sequential_codebook(editor, cases, layer=0)
    assert seq["efficacy"] == 1.0 and seq["locality"] >= 0.9 and seq["edits"] == 5.0


def test_bad_requests_are_refused(editor: Editor) -> None:
    with pytest.raises(InvalidArgumentError, match="already answers 'Vobolport'"):
        editor.request("The capital of Stadeirnia is", "Stadeirnia", "Vobolport")
    with pytest.raises(InvalidArgumentError, match="does not occur in the prompt"):
        editor.request("The capital of Stadeirnia is", "Trowouland", "Wuthaem")
    with pytest.raises(InvalidArgumentError, match=r"layers 0\.\.3"):
        editor.check_layer(4)


def test_codebook_rollback_restores_answers_exactly(editor: Editor, cases: list, tmp_path: Path) -> None:
    a, b = cases[0], cases[1]
    prompts = [a.prompt, b.prompt, *a.paraphrases, "The capital of Trowouland is"]
    base = _logits(editor, prompts)
    with CubeStore(tmp_path / "store") as store:
        first = apply_edits(
            editor, store, method="grace", default_cube="edits", single=(a.prompt, a.subject, a.target_new)
        )
        assert first["cube"] == "edits@1.0.0" and first["changes"][0]["old"] == a.target_true
        with attach(editor.model, current_cube(store, "edits")):
            v1 = _logits(editor, prompts)
            assert editor.answer(a.prompt) == a.target_new
        second = apply_edits(
            editor, store, method="grace", default_cube="edits", single=(b.prompt, b.subject, b.target_new)
        )
        assert second["cube"] == "edits@1.1.0" and second["parent"] == "edits@1.0.0"
        v2_cube = current_cube(store, "edits")
        assert list(v2_cube.manifest.version_chain) == [store.get_manifest("edits", "1.0.0").digest]
        assert len(describe_edit(v2_cube)["changes"]) == 2
        with attach(editor.model, v2_cube):
            assert editor.answer(a.prompt) == a.target_new and editor.answer(b.prompt) == b.target_new
        Lifecycle(store).rollback("edits", "1.0.0", reason="the second edit was wrong")
        attached = attach_current(editor.model, store, ["edits"])
        assert [x.ref for x in attached] == ["edits@1.0.0"]
        for got, want in zip(_logits(editor, prompts), v1, strict=True):
            assert torch.equal(got, want)
        for x in attached:
            x.remove()
    for got, want in zip(_logits(editor, prompts), base, strict=True):
        assert torch.equal(got, want)  # nothing left behind


def test_rome_cube_runs_in_the_runtime_and_rolls_back(editor: Editor, cases: list, tmp_path: Path) -> None:
    a, b = cases[2], cases[3]
    prompts = [a.prompt, b.prompt]
    base = _logits(editor, prompts)
    runtime = ModuleRuntime(editor.model)
    try:
        with CubeStore(tmp_path / "store") as store:
            apply_edits(
                editor,
                store,
                method="rome",
                layer=0,
                default_cube="fixes",
                single=(a.prompt, a.subject, a.target_new),
            )
            v1 = runtime.load(current_cube(store, "fixes"))
            runtime.activate(v1.ref)
            assert editor.answer(a.prompt) == a.target_new
            v1_logits = _logits(editor, prompts)
            runtime.deactivate()
            assert all(torch.equal(x, y) for x, y in zip(_logits(editor, prompts), base, strict=True))
            second = apply_edits(
                editor,
                store,
                method="rome",
                layer=0,
                default_cube="fixes",
                single=(b.prompt, b.subject, b.target_new),
            )
            assert second["cube"] == "fixes@1.1.0"
            v2 = runtime.load(current_cube(store, "fixes"))
            assert v2.manifest.payload.lora.rank >= 2  # the parent's edit and the new one, side by side
            Lifecycle(store).rollback("fixes", "1.0.0", reason="undo the second fix")
            back = runtime.load(current_cube(store, "fixes"))
            assert back.ref == v1.ref
            runtime.activate(back.ref)
            assert all(torch.equal(x, y) for x, y in zip(_logits(editor, prompts), v1_logits, strict=True))
    finally:
        runtime.close()


def test_codebook_re_edit_supersedes_the_earlier_edit(editor: Editor, cases: list) -> None:
    case = cases[4]
    ced = editor.codebook_editor(layer=0)
    try:
        first = editor.request(case.prompt, case.subject, case.target_new)
        ced.edit(first)
        assert editor.answer(case.prompt) == case.target_new
        second = editor.request(case.prompt, case.subject, case.target_true)  # put the true answer back
        assert second.old_target == case.target_new
        result = ced.edit(second)
        assert result.merged
        assert editor.answer(case.prompt) == case.target_true
        (entry_records,) = {tuple(ced.codebook.entry_records[e]) for e in result.entries}
        assert [ced.codebook.records[r]["target"] for r in entry_records] == [case.target_true]
    finally:
        ced.hook.remove()
