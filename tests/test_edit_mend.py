"""The MEND editor on the embedded model: its inputs are the true gradient, training lowers the edit loss,
edits are cubes, a batch is the sum of single edits, and bad input (another base model, a damaged cube,
no editor) is refused with typed errors and changes nothing.

A tiny editor (a few dozen steps on part of the train split) keeps this under a minute; the figures on the
test split come from ``memfed bench evolve`` (``memfed.bench.evolve_mend``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from cube_support import rebuilt_cube

from memfed.cli.main import main
from memfed.cube.core import MemCube
from memfed.cube.manifest import CubeManifest
from memfed.cube.payload import read_header, tensor_views
from memfed.errors import (
    IncompatibleModelError,
    InvalidArgumentError,
    InvalidManifestError,
    NotFoundError,
)
from memfed.node.editing import protocols
from memfed.node.editing.apply import apply_edits
from memfed.node.editing.counterfact import COUNTERFACT_PATH, EditCase, load_cases, split_cases
from memfed.node.editing.cubes import describe_edit, read_edit
from memfed.node.editing.editor import Editor
from memfed.node.editing.keys import context_prefixes
from memfed.node.editing.lowrank import LowRankEdit, apply_to_weights
from memfed.node.editing.mend import MendConfig, MendEditor, edit_pairs
from memfed.node.editing.mend_cube import CONFIG_KEY, mend_cube, newest_mend, read_mend
from memfed.node.editing.mend_train import _Case, _pick_probes, _probe_index, _probes, train_mend
from memfed.node.editing.stats import default_corpus
from memfed.node.editing.text import encode
from memfed.node.models import load_host_model, save_tiny_model_dir
from memfed.node.store import CubeStore

TINY = MendConfig(
    layers=(0,), steps=40, batch=8, rank=16, locality_prompts=4, extra_targets=0, margin=1.0, near_probes=0.0
)


@dataclass
class Setup:
    editor: Editor
    mend: MendEditor
    cube: MemCube
    train: list[EditCase]
    test: list[EditCase]


@pytest.fixture(scope="module")
def setup(default_model_dir: Path) -> Iterator[Setup]:
    model, tokenizer = load_host_model(default_model_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    editor = Editor(model, tokenizer, texts=default_corpus()[::6], cache_stats=False)
    train, test = split_cases(load_cases())
    mend = train_mend(
        model, tokenizer, train[:60], TINY, editor.second_moments, fingerprint=editor.fingerprint
    )
    yield Setup(editor, mend, mend_cube(mend), train, test)


def _target_nll(editor: Editor, prompt: str, target: str) -> float:
    enc = encode(editor.tokenizer, prompt, None, target)
    with torch.no_grad():
        logits = editor.model(input_ids=torch.tensor([enc.full])).logits[0].float()
    logp = torch.log_softmax(logits[len(enc.ids) - 1 : -1], -1)
    return float(-logp[torch.arange(len(enc.target)), torch.tensor(enc.target)].mean())


def test_pairs_are_the_gradient_and_independent_of_the_batch(setup: Setup) -> None:
    editor, layout = setup.editor, setup.editor.layout
    reqs = [c.request() for c in setup.test[:3]]
    prefixes = context_prefixes(editor.model, editor.tokenizer)
    together = edit_pairs(layout, editor.tokenizer, reqs, [0, 1], prefixes)
    for req, pairs in zip(reqs, together, strict=True):
        (alone,) = edit_pairs(layout, editor.tokenizer, [req], [0, 1], prefixes)
        for layer in (0, 1):
            assert torch.allclose(pairs.keys[layer], alone.keys[layer], atol=1e-4)
            assert torch.allclose(pairs.grads[layer], alone.grads[layer], atol=1e-5)
    # δ is ∂NLL/∂output: a small step against it at the subject lowers the target's NLL, one along it raises
    req, pairs = reqs[0], together[0]
    (plain,) = edit_pairs(layout, editor.tokenizer, [req], [0], [""])
    key, grad = plain.keys[0][0], plain.grads[0][0]
    rank_one = (key / key.dot(key)).unsqueeze(0)  # maps the subject's key to exactly the given change
    before = _target_nll(editor, req.prompt, req.target)
    for sign, better in ((-1.0, True), (1.0, False)):
        step = LowRankEdit({layout.down_proj[0]: (rank_one, (sign * 0.5 * grad / grad.norm()).unsqueeze(1))})
        with apply_to_weights(editor.model, step):
            assert (_target_nll(editor, req.prompt, req.target) < before) == better
    assert pairs.nll > 0 and pairs.keys[0].shape[0] == pairs.grads[0].shape[0] >= 1


def test_training_lowers_the_edit_loss_and_edits_unseen_subjects(setup: Setup) -> None:
    info = setup.mend.info
    assert int(info["steps"]) == TINY.steps and int(info["cases"]) == 60
    assert float(info["final_edit_nll"]) < 0.8 * float(info["first_edit_nll"])  # one batch each: noisy
    seen = {c.subject for c in setup.train}
    cases = [c for c in setup.test[:4] if c.subject not in seen]
    assert len(cases) == 4  # the split is by subject: test subjects were never edited in training
    for case in cases:
        before = _target_nll(setup.editor, case.prompt, case.target_new)
        with apply_to_weights(setup.editor.model, setup.mend.edit([case.request()])):
            assert _target_nll(setup.editor, case.prompt, case.target_new) < before - 1.0
    summary = protocols.mend_edits(setup.mend, cases)
    assert summary["cases"] == 4 and summary["efficacy"] >= 0.5 and summary["seconds_per_edit"] > 0


def test_a_batch_is_one_joint_fit_of_every_edits_keys(setup: Setup) -> None:
    """Several edits in one call: each subject key maps to its own value (exactly with λ = 0), keys at a
    word piece two edited subjects share are left out, and the default ridge fit differs from the sum of
    single edits (which leaks: see ``MendEditor.joint_factors``)."""
    editor, layout = setup.editor, setup.editor.layout
    reqs = [c.request() for c in setup.test[4:10]]
    name = layout.down_proj[0]
    exact = replace(setup.mend, config=replace(setup.mend.config, batch_lambda=0.0, batch_scale=1.0))
    pairs = edit_pairs(layout, editor.tokenizer, reqs, [0], context_prefixes(editor.model, editor.tokenizer))
    owners: dict[int, set[str]] = {}
    for req, p in zip(reqs, pairs, strict=True):
        for form, pos in p.labels:
            owners.setdefault(form[pos], set()).add(req.subject)
    shared = [t for t, subjects in owners.items() if len(subjects) > 1]
    delta = exact.edit(reqs).delta(name)
    checked = 0
    for req, p in zip(reqs, pairs, strict=True):
        with torch.no_grad():
            values, _ = setup.mend.nets[0](p.keys[0], p.grads[0])
        for i, (form, pos) in enumerate(p.labels):
            if owners[form[pos]] == {req.subject}:
                assert torch.allclose(delta @ p.keys[0][i], values[i], atol=1e-2 * float(values[i].norm()))
                checked += 1
    assert checked >= len(reqs)
    rows = sum(len(p.labels) for p in pairs)
    assert exact.edit(reqs).rank < rows if shared else exact.edit(reqs).rank == rows
    summed = sum(setup.mend.edit([r]).delta(name) for r in reqs)
    assert not torch.allclose(
        setup.mend.edit(reqs).delta(name), summed, atol=1e-3 * float(summed.abs().max())
    )
    summary = protocols.mend_batch(setup.mend, setup.test[4:10])
    assert summary["cases"] == 6 and summary["rank"] >= 6


def test_locality_probes_favour_subjects_that_share_a_word_piece(setup: Setup) -> None:
    """The prompts an edit most easily spills into (subjects sharing a token with the edited one) are
    among each training edit's locality probes."""
    tokenizer = setup.editor.tokenizer
    cases = setup.train[:60]
    index = _probe_index(tokenizer, _probes(setup.editor.model, tokenizer, cases), [c.subject for c in cases])

    def pieces(subject: str) -> set[int]:
        return set(tokenizer(" " + subject)["input_ids"]) | set(tokenizer(subject)["input_ids"])

    with_near = [c for c in cases if index.near[c.subject]]
    assert with_near
    for case in with_near:
        assert all(
            p.subject != case.subject and pieces(p.subject) & pieces(case.subject)
            for p in index.near[case.subject]
        )
    case = with_near[0]
    fake = _Case(case.relation, case.subject, None, [], [])  # type: ignore[arg-type]
    picked = _pick_probes(random.Random(0), fake, index, 6, 0.5)
    near = {id(p) for p in index.near[case.subject]}
    assert len(picked) == 6 and sum(id(p) in near for p in picked) >= min(3, len(near))


def test_the_editor_cube_round_trips(setup: Setup, tmp_path: Path) -> None:
    cube = setup.cube
    assert cube.manifest.annotations["memfed.editor.form"] == "mend-editor/v1"
    back = read_mend(cube, setup.editor.model, setup.editor.tokenizer)
    assert back.config == setup.mend.config and back.info["ref"] == cube.ref
    req = setup.test[0].request()
    name = setup.editor.layout.down_proj[0]
    assert torch.allclose(back.edit([req]).delta(name), setup.mend.edit([req]).delta(name), atol=1e-6)
    with CubeStore(tmp_path / "store") as store:
        with pytest.raises(NotFoundError, match="no MEND editor"):
            newest_mend(store, setup.editor.model)
        store.put(cube.manifest, cube.payload)
        assert newest_mend(store, setup.editor.model).ref == cube.ref


def test_foreign_or_damaged_editor_cubes_are_refused(setup: Setup) -> None:
    model, tokenizer, cube = setup.editor.model, setup.editor.tokenizer, setup.cube
    m = CubeManifest()
    m.CopyFrom(cube.manifest)
    m.base_model.config_digest = bytes(32)
    with pytest.raises(IncompatibleModelError, match="was made for"):
        read_mend(MemCube(m, cube.payload), model, tokenizer)
    tensors = {k: v.clone() for k, v in tensor_views(cube.payload).items()}
    meta = dict(read_header(cube.payload)["__metadata__"])
    with pytest.raises(InvalidArgumentError, match="do not match its config"):
        read_mend(
            rebuilt_cube(cube, {k: v for k, v in tensors.items() if k != "c_inv.0"}, meta), model, tokenizer
        )
    poisoned = {**tensors, "net.0.inner.bias": torch.full_like(tensors["net.0.inner.bias"], float("nan"))}
    with pytest.raises(InvalidArgumentError, match="NaN"):
        read_mend(rebuilt_cube(cube, poisoned, meta), model, tokenizer)
    with pytest.raises(InvalidArgumentError, match="config"):
        read_mend(rebuilt_cube(cube, tensors, {**meta, CONFIG_KEY: "[1, 2]"}), model, tokenizer)
    bad_layers = json.dumps({**json.loads(meta[CONFIG_KEY]), "layers": [9]})
    with pytest.raises(InvalidArgumentError, match="do not exist"):
        read_mend(rebuilt_cube(cube, tensors, {**meta, CONFIG_KEY: bad_layers}), model, tokenizer)
    other = MemCube(CubeManifest(), cube.payload)
    other.manifest.CopyFrom(cube.manifest)
    other.manifest.annotations["memfed.editor.form"] = "parameter-translator/v1"
    with pytest.raises(InvalidManifestError, match="not a MEND editor"):
        read_mend(other, model, tokenizer)


def test_apply_stores_an_edit_cube_and_refuses_a_foreign_editor(setup: Setup, tmp_path: Path) -> None:
    editor = setup.editor
    case = setup.test[1]
    single = (case.prompt, case.subject, case.target_new)
    with CubeStore(tmp_path / "store") as store:
        with pytest.raises(InvalidArgumentError, match="needs a trained editor"):
            apply_edits(editor, store, method="mend", default_cube="m", single=single)
        foreign = replace(setup.mend, fingerprint=_foreign(setup.mend))
        weights = editor.layout.down(0).weight.clone()
        with pytest.raises(IncompatibleModelError):
            apply_edits(editor, store, method="mend", default_cube="m", single=single, mend=foreign)
        assert store.list() == [] and torch.equal(editor.layout.down(0).weight, weights)
        with pytest.raises(InvalidArgumentError, match="edits layers"):
            apply_edits(
                editor, store, method="mend", default_cube="m", single=single, mend=setup.mend, layer=2
            )
        report = apply_edits(editor, store, method="mend", default_cube="m", single=single, mend=setup.mend)
        assert torch.equal(editor.layout.down(0).weight, weights)  # the weights are restored afterwards
        stored = store.get("m", report["version"])
        info = describe_edit(stored)
        assert info["method"] == "mend" and info["layers"] == "0" and case.subject in info["changes"][0]
        edit = read_edit(stored)
        assert isinstance(edit, LowRankEdit) and edit.modules == [editor.layout.down_proj[0]]
        assert report["changes"][0]["old"] and report["changes"][0]["new"] == case.target_new


def _foreign(mend: MendEditor):
    fp = type(mend.fingerprint)()
    fp.CopyFrom(mend.fingerprint)
    fp.config_digest = bytes(32)
    return fp


def test_editor_settings_are_checked() -> None:
    with pytest.raises(InvalidArgumentError, match="do not exist"):
        MendConfig(layers=(7,)).check(4)
    with pytest.raises(InvalidArgumentError):
        MendConfig(key_side="both").check()
    for bad in ({"margin": -1.0}, {"batch_scale": 0.0}, {"near_probes": 2.0}):
        with pytest.raises(InvalidArgumentError):
            replace(TINY, **bad).check()
    with pytest.raises(InvalidArgumentError, match="unknown fields"):
        MendConfig.from_json_dict({"layers": [0], "surprise": 1})
    assert MendConfig.from_json_dict(TINY.to_json_dict()) == TINY


def test_cli_trains_an_editor_and_applies_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``train-editor`` then ``apply --method mend`` as a user runs them (a tiny random model: mechanics);
    an editor for the embedded model is refused on the tiny one, and nothing is stored."""
    monkeypatch.setenv("MEMFED_HOME", str(tmp_path / "home"))  # key statistics are cached here
    model_dir = str(save_tiny_model_dir("llama", tmp_path / "tiny-llama"))
    records = (COUNTERFACT_PATH.read_text(encoding="utf-8").splitlines())[:16]
    cases = tmp_path / "cases.jsonl"
    cases.write_text("\n".join(records) + "\n", encoding="utf-8")
    store = str(tmp_path / "store")
    common = ("--store", store, "--model", model_dir, "--json")

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    apply = ("edit", "apply", "The capital of Veltria is", "--subject", "Veltria", "--target", "Quorn")
    code, _, err = run(*apply, "--method", "mend", *common)
    assert code == NotFoundError.exit_code and "train-editor" in err
    code, out, err = run(
        "edit", "train-editor", "--cases", str(cases), "--steps", "2", "--layer", "0", *common
    )
    assert code == 0, err
    trained = json.loads(out)
    assert trained["ref"] == "mend-editor@1.0.0" and trained["steps"] == "2" and trained["held_out_cases"] > 0
    code, out, err = run(*apply, "--method", "mend", *common)
    assert code == 0, err
    applied = json.loads(out)
    assert (
        applied["method"] == "mend" and applied["layers"] == "0" and applied["cube"] == "edit-Veltria@1.0.0"
    )
    with CubeStore(Path(store)) as s:  # the same editor, said to be made for another base model
        trained_cube = s.get("mend-editor", "1.0.0")
        m = CubeManifest()
        m.CopyFrom(trained_cube.manifest)
        m.cube_id = "foreign"
        m.base_model.config_digest = bytes(32)
        s.put(m, trained_cube.payload)
        before = sorted(x.cube_id + x.version for x in s.list())
    code, _, err = run(*apply, "--method", "mend", "--editor", "foreign", "--cube", "other", *common)
    assert code == IncompatibleModelError.exit_code and "was made for" in err
    with CubeStore(Path(store)) as s:
        assert sorted(x.cube_id + x.version for x in s.list()) == before
