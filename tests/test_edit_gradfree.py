"""Gradient-free editing on the embedded model: forward passes only, a ROME-shaped rank-one edit that
moves the model toward the new answer, and clear errors for bad input.

Small sizes (the comparison with ROME on the whole test split is ``memfed bench evolve``, part ``scope``).
"""

from __future__ import annotations

import pytest
import torch

from memfed.errors import InvalidArgumentError
from memfed.node.editing.counterfact import load_cases, split_cases
from memfed.node.editing.cubes import lowrank_cube, read_edit
from memfed.node.editing.editor import Editor
from memfed.node.editing.evaluate import Evaluator, summarize
from memfed.node.editing.gradfree import gradfree_edit
from memfed.node.editing.lowrank import apply_to_weights

LAYER = 0  # the layer causal tracing picks on the embedded model (memfed bench edit's "layer")


@pytest.fixture(scope="module")
def cases():
    return split_cases(load_cases())[1][:6]


def _no_backward(*args: object, **kwargs: object) -> None:
    raise AssertionError("a backward pass was run")


def test_edit_uses_forward_passes_only_and_moves_the_model(editor: Editor, cases, monkeypatch) -> None:
    ev = Evaluator(editor.model, editor.tokenizer, cases)
    editor.second_moments  # noqa: B018 - computed before backward is forbidden (it needs none anyway)
    monkeypatch.setattr(torch.autograd, "backward", _no_backward)
    monkeypatch.setattr(torch.autograd, "grad", _no_backward)
    before = summarize(ev.score())
    scores = []
    for case in cases:
        result = gradfree_edit(editor, case.request(), LAYER)
        assert result.steps == 0 and result.layer == LAYER and len(result.donors) == 5
        assert result.edit.rank == result.keys.shape[0]
        with apply_to_weights(editor.model, result.edit):
            scores.extend(ev.score([case]))
    after = summarize(scores)
    assert before["efficacy"] == 0.0
    assert after["efficacy"] >= 0.3  # measured 0.5 on these six; ROME reaches 0.83
    assert after["locality"] >= 0.9


def test_context_source_runs_and_edit_makes_a_cube(editor: Editor, cases) -> None:
    req = cases[0].request()
    result = gradfree_edit(editor, req, LAYER, source="context")
    assert result.donors == () and torch.isfinite(result.delta).all()
    cube = lowrank_cube(
        editor.model, result.edit, cube_id="gf", method="gradfree", requests=[req], layers=[0]
    )
    back = read_edit(cube)
    (a, b) = next(iter(back.factors.values()))
    assert torch.allclose(b @ a, result.edit.delta(next(iter(result.edit.factors))), atol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [{"source": "weights"}, {"scales": ()}, {"scales": (1.0, -2.0)}, {"donors": []}],
)
def test_bad_input_is_refused(editor: Editor, cases, kwargs) -> None:
    with pytest.raises(InvalidArgumentError):
        gradfree_edit(editor, cases[0].request(), LAYER, **kwargs)


def test_layer_out_of_range_is_refused(editor: Editor, cases) -> None:
    with pytest.raises(InvalidArgumentError):
        gradfree_edit(editor, cases[0].request(), 99)
