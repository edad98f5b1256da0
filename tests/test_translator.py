"""The parameter translator (``internalize --fast``): mechanics at CI size, bad input refused.

A translator trained for a few steps on three small synthetic documents recalls nothing, so these tests
check mechanics (one forward pass, a runnable LoRA cube, the gate and the fallback, storage and refusal
of foreign or damaged translator cubes); recall is measured by ``memfed bench internalize``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from cube_support import rebuilt_cube

from memfed.cube.core import MemCube
from memfed.cube.manifest import CubeManifest
from memfed.cube.payload import read_header, tensor_views
from memfed.errors import IncompatibleModelError, InvalidArgumentError, InvalidManifestError, NotFoundError
from memfed.node.conversion.internalize import InternalizeSettings, RecallGateError
from memfed.node.conversion.synth import synthetic_document
from memfed.node.conversion.train import LoraTrainConfig
from memfed.node.conversion.translator import TranslatorConfig
from memfed.node.conversion.translator_cube import (
    CONFIG_KEY,
    newest_translator,
    read_translator,
    translator_cube,
)
from memfed.node.conversion.translator_fast import fast_internalize, translate
from memfed.node.conversion.translator_train import Translator, train_translator
from memfed.node.models import load_host_model
from memfed.node.runtime import ModuleRuntime
from memfed.node.store import CubeStore

TINY = TranslatorConfig(steps=3, train_documents=3, doc_tokens=24, replay_per_doc=0, replay_prompts=0)
# The fallback trains a LoRA: two steps on a handful of replay prompts keep it to a second or two.
QUICK = LoraTrainConfig(steps=2, batch_size=8, replay_batch=2)


@dataclass
class Setup:
    model: torch.nn.Module
    tokenizer: Any
    translator: Translator
    cube: MemCube


@pytest.fixture(scope="module")
def setup(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    mp = pytest.MonkeyPatch()
    mp.setenv("MEMFED_HOME", str(tmp_path_factory.mktemp("home")))  # key statistics are cached here
    model, tokenizer = load_host_model(default_model_dir)
    translator = train_translator(model, tokenizer, TINY)
    yield Setup(model, tokenizer, translator, translator_cube(translator))
    mp.undo()


def _settings(min_recall: float) -> InternalizeSettings:
    return InternalizeSettings(train=QUICK, min_recall=min_recall, replay_prompts=8, control_prompts=8)


def test_generated_cube_runs_in_the_runtime_after_one_forward_pass(setup: Setup) -> None:
    doc = synthetic_document(40, setup.tokenizer, seed=5)
    translator = read_translator(setup.cube, setup.model)  # stored and read back: the same network
    calls: list[int] = []
    handle = setup.model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        cube = translate(translator, setup.tokenizer, [doc], setup.translator.fingerprint, cube_id="fast.t")
    finally:
        handle.remove()
    assert len(calls) == 1  # one batched pass of the base model, no training
    facts = len(doc.facts())
    targets = cube.manifest.payload.lora.targets
    assert {t.rank for t in targets} == {facts} and len(targets) == len(TINY.layers)
    ids = setup.tokenizer(doc.facts()[0].sentence, return_tensors="pt")["input_ids"]
    rt = ModuleRuntime(setup.model)
    try:
        bare = setup.model(input_ids=ids).logits
        rt.load(cube)
        with rt.routed(modules=(cube.ref,)):
            moved = setup.model(input_ids=ids).logits
    finally:
        rt.close()
    assert torch.isfinite(moved).all() and not torch.equal(bare, moved)


def test_passing_gate_registers_the_fast_cube(setup: Setup, tmp_path: Path) -> None:
    doc = synthetic_document(40, setup.tokenizer, seed=6)
    with CubeStore(tmp_path / "store") as store:
        report, _ = fast_internalize(
            setup.model, setup.tokenizer, [doc], setup.translator, cube_id="fast.ok", store=store,
            settings=_settings(0.0),
        )  # fmt: skip
        assert report.path == "fast" and report.result["registered"]
        stored = store.get_manifest("fast.ok", "1.0.0")
    assert stored.origin.method == "internalize" and stored.origin.params["fast"] == "translator"
    assert report.fast.generate_ms > 0 and report.fast.passed
    assert json.loads(stored.origin.params["probe_keys"])


def test_below_the_gate_falls_back_to_training_or_fails(setup: Setup) -> None:
    doc = synthetic_document(40, setup.tokenizer, seed=7)
    with pytest.raises(RecallGateError) as no_fallback:
        fast_internalize(
            setup.model, setup.tokenizer, [doc], setup.translator, cube_id="fast.no", settings=_settings(1.0),
            fallback=False,
        )  # fmt: skip
    assert "translator" in no_fallback.value.report.reason
    assert not no_fallback.value.report.registered
    # Gate 1.0: the translator fails it, so the trained path runs (and, two steps long, fails it too).
    with pytest.raises(RecallGateError) as trained:
        fast_internalize(
            setup.model, setup.tokenizer, [doc], setup.translator, cube_id="fast.fb", settings=_settings(1.0)
        )
    assert "training instead" in trained.value.report.reason
    assert trained.value.report.training_items > 0  # the trained path's report: it did train


def test_newest_translator_is_found_for_this_model_only(setup: Setup, tmp_path: Path) -> None:
    with CubeStore(tmp_path / "store") as store:
        with pytest.raises(NotFoundError):
            newest_translator(store, setup.model)
        store.put(setup.cube.manifest, setup.cube.payload)
        assert newest_translator(store, setup.model).ref == setup.cube.ref


def test_translator_for_another_base_model_is_refused(setup: Setup) -> None:
    m = CubeManifest()
    m.CopyFrom(setup.cube.manifest)
    m.base_model.config_digest = bytes(32)
    with pytest.raises(IncompatibleModelError, match="was made for"):
        read_translator(MemCube(m, setup.cube.payload), setup.model)


def test_malformed_translator_cubes_are_refused(setup: Setup) -> None:
    cube = setup.cube
    tensors = {k: v.clone() for k, v in tensor_views(cube.payload).items()}
    meta = dict(read_header(cube.payload)["__metadata__"])
    missing = {k: v for k, v in tensors.items() if not k.startswith("c_inv.")}
    with pytest.raises(InvalidArgumentError, match="do not match its config"):
        read_translator(rebuilt_cube(cube, missing, meta), setup.model)
    poisoned = {**tensors, "net.inner.bias": torch.full_like(tensors["net.inner.bias"], float("nan"))}
    with pytest.raises(InvalidArgumentError, match="NaN"):
        read_translator(rebuilt_cube(cube, poisoned, meta), setup.model)
    with pytest.raises(InvalidArgumentError, match="config"):
        read_translator(rebuilt_cube(cube, tensors, {**meta, CONFIG_KEY: "{not json"}), setup.model)
    bad_layers = json.dumps({**json.loads(meta[CONFIG_KEY]), "layers": [9]})
    with pytest.raises(InvalidArgumentError, match="do not exist"):
        read_translator(rebuilt_cube(cube, tensors, {**meta, CONFIG_KEY: bad_layers}), setup.model)
    lora = MemCube(CubeManifest(), b"")
    lora.manifest.CopyFrom(cube.manifest)
    lora.manifest.annotations.clear()
    with pytest.raises(InvalidManifestError, match="not a parameter translator"):
        read_translator(lora, setup.model)


def test_translator_settings_are_checked() -> None:
    with pytest.raises(InvalidArgumentError):
        replace(TINY, layers=()).check(4)
    with pytest.raises(InvalidArgumentError):
        TranslatorConfig.from_json_dict({"layers": [1], "surprise": 1})
