"""Base-model fingerprints: same weights match in any dtype, other weights or shapes never do."""

from __future__ import annotations

import copy

import pytest
import torch

from memfed.cube.fingerprint import check_base_model, fingerprint_model, mismatch_reasons
from memfed.errors import IncompatibleModelError
from memfed.node.models import tiny_gpt2, tiny_llama


def test_same_model_matches_across_dtypes_and_copies() -> None:
    model = tiny_llama(seed=0)
    fp = fingerprint_model(model)
    assert mismatch_reasons(fp, fingerprint_model(copy.deepcopy(model))) == []
    for dtype in (torch.float16, torch.bfloat16):
        assert mismatch_reasons(fp, fingerprint_model(copy.deepcopy(model).to(dtype))) == []
    assert len(fp.config_digest) == 32 and len(fp.shapes_digest) == 32 and len(fp.weight_sample) > 0


def test_other_weights_shapes_or_architectures_differ() -> None:
    fp = fingerprint_model(tiny_llama(seed=0))
    assert mismatch_reasons(fp, fingerprint_model(tiny_llama(seed=1))) == ["weight values"]
    assert "tensor names/shapes" in mismatch_reasons(
        fp, fingerprint_model(tiny_llama(seed=0, num_hidden_layers=3))
    )
    assert "model config" in mismatch_reasons(fp, fingerprint_model(tiny_gpt2(seed=0)))


def test_a_small_training_step_is_detected() -> None:
    model = tiny_llama(seed=0)
    fp = fingerprint_model(model)
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    assert mismatch_reasons(fp, fingerprint_model(tuned)) == ["weight values"]


def test_the_seed_keys_the_sample() -> None:
    model = tiny_llama(seed=0)
    a, b = fingerprint_model(model, seed=1), fingerprint_model(model, seed=2)
    assert list(a.weight_sample) != list(b.weight_sample)
    check_base_model(a, model, what="cube x")  # recomputes with the cube's seed


def test_check_names_both_models() -> None:
    fp = fingerprint_model(tiny_llama(seed=0), name="made-for")
    with pytest.raises(IncompatibleModelError, match=r"made-for.*GPT2LMHeadModel"):
        check_base_model(fp, tiny_gpt2(seed=0), what="cube legal@1.0.0")
