"""The MEND part of ``memfed bench evolve``: a meta-learned editor against ROME on unseen subjects.

The editor trains on the fact file's train split (``split_cases``: by subject) and is scored on the test
split only, each case edited alone (ROME's protocol) and 100 cases in one call (MEMIT's); ROME runs on the
same test cases in the same run, so the two are compared on one machine under one load. A trained editor
is cached as a cube in ``$MEMFED_HOME/cache/mend-editors`` (keyed by model fingerprint and config), so a
rerun scores without retraining; ``mend_train_seconds`` is the training time of the editor used.

One torch thread, as ``memfed bench edit`` (see there why).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from typing import Any

from memfed.bench.harness import one_torch_thread
from memfed.config import memfed_home
from memfed.node.editing import protocols
from memfed.node.editing.counterfact import load_cases, split_cases
from memfed.node.editing.editor import Editor
from memfed.node.editing.mend import MendConfig, MendEditor
from memfed.node.editing.mend_cube import mend_cube, read_mend
from memfed.node.editing.mend_train import train_mend

QUICK_CONFIG = MendConfig(steps=60)  # quick runs: the mechanics and rough figures in a fraction of the time
SIZES = {"single": (6, 10_000), "batch": (12, 100), "rome": (6, 10_000)}  # (quick, full); test split: 113


def _cached_editor(editor: Editor, config: MendConfig, train: list[Any]) -> tuple[MendEditor, bool]:
    """The editor for ``config`` from the cache, or trained now and cached; and whether it was cached."""
    from memfed.node.store import CubeStore

    key = json.dumps(
        {"fingerprint": editor.fingerprint.fingerprint_id, "config": config.to_json_dict(),
         "train": [c.case_id for c in train]},
        sort_keys=True,
    )  # fmt: skip
    cube_id = "mend-" + hashlib.sha256(key.encode()).hexdigest()[:16]
    with CubeStore(memfed_home() / "cache" / "mend-editors") as store:
        if store.has(cube_id):
            version = store.current_version(cube_id)
            if version is not None:
                return read_mend(store.get(cube_id, version), editor.model, editor.tokenizer), True
        mend = train_mend(
            editor.model,
            editor.tokenizer,
            train,
            config,
            editor.second_moments,
            fingerprint=editor.fingerprint,
        )
        cube = mend_cube(mend, cube_id=cube_id)
        store.put(cube.manifest, cube.payload)
    return mend, False


def run_part(quick: bool) -> dict[str, float]:
    """Train (or load) the editor, score it and ROME on the test split; figures are fractions 0-1."""
    from memfed.node.models import default_model_dir, load_host_model

    with one_torch_thread():
        model, tokenizer = load_host_model(default_model_dir())
        for p in model.parameters():
            p.requires_grad_(False)
        return _run(quick, Editor(model, tokenizer))


def _run(quick: bool, editor: Editor) -> dict[str, float]:
    size = {k: v[0 if quick else 1] for k, v in SIZES.items()}
    train, test = split_cases(load_cases())
    layer = editor.choose_layer([c.request() for c in train[:4]], "all")
    config = QUICK_CONFIG if quick else MendConfig()
    config = replace(config, layers=(layer,))
    t0 = time.perf_counter()
    mend, cached = _cached_editor(editor, config, train)
    obtain_seconds = time.perf_counter() - t0

    single = protocols.mend_edits(mend, test[: size["single"]])
    batch = protocols.mend_batch(mend, test[: size["batch"]])
    rome = protocols.single_edits(editor, test[: size["rome"]], layer)
    return {
        "mend_efficacy": single["efficacy"],
        "mend_generalization": single.get("generalization", 0.0),
        "mend_locality": single.get("locality", 1.0),
        "mend_ms_per_edit": round(1000 * single["seconds_per_edit"], 2),
        "mend_batch100_efficacy": batch["efficacy"],
        "mend_batch100_generalization": batch.get("generalization", 0.0),
        "mend_batch100_locality": batch.get("locality", 1.0),
        "mend_batch100_seconds": batch["seconds"],
        "mend_batch_cases": batch["cases"],
        "mend_test_cases": single["cases"],
        "mend_train_cases": float(len(train)),
        "mend_train_seconds": float(mend.info.get("train_seconds", "nan")),
        "mend_editor_cached": float(cached),
        "mend_obtain_seconds": round(obtain_seconds, 2),
        "mend_layer": float(layer),
        "rome_efficacy": rome["efficacy"],
        "rome_generalization": rome.get("generalization", 0.0),
        "rome_locality": rome.get("locality", 1.0),
        "rome_s_per_edit": rome["seconds_per_edit"],
        "rome_cases": rome["cases"],
    }
