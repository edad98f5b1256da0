"""Shared pytest fixtures. Keep this file small: other modules' fixtures will be added here too."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread for the whole run. The models here are tiny and this machine's two cores are
    shared (CI runs beside other jobs): two threads made forward passes 10-50x slower than one whenever
    the second core was busy (OpenMP workers wait on each other), and nothing here is big enough to split.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded default model, from the real user cache (``memfed.node.models.default_model_dir``).

    Built once per machine and recipe (minutes, the first time only) and reused by every later test run,
    which is why this deliberately does not use a temporary cache.
    """
    from memfed.node.models import default_model_dir as build_or_reuse

    return build_or_reuse()


@pytest.fixture(scope="module")
def frozen_default_model(default_model_dir: Path) -> tuple[Any, Any]:
    """(model, tokenizer): a fresh load of the embedded model per test module, weights frozen (the editing
    methods differentiate with respect to activations only), so one module's edits never leak into the
    next one's."""
    from memfed.node.models import load_host_model

    model, tokenizer = load_host_model(default_model_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


@pytest.fixture(scope="module")
def editor(frozen_default_model: tuple[Any, Any]) -> Any:
    """An ``Editor`` on ``frozen_default_model`` whose key statistics come from a sixth of the default
    corpus, not cached (fast, and independent of the user's cache). Modules that edit other models
    define their own ``editor``."""
    from memfed.node.editing.editor import Editor
    from memfed.node.editing.stats import default_corpus

    model, tokenizer = frozen_default_model
    return Editor(model, tokenizer, texts=default_corpus()[::6], cache_stats=False)
