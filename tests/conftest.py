"""Shared pytest fixtures. Keep this file small: other modules' fixtures will be added here too."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded default model, from the real user cache (``memfed.node.models.default_model_dir``).

    Built once per machine and recipe (minutes, the first time only) and reused by every later test run,
    which is why this deliberately does not use a temporary cache.
    """
    from memfed.node.models import default_model_dir as build_or_reuse

    return build_or_reuse()
