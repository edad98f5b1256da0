"""Second-moment statistics C = E[k kᵀ] of every MLP down-projection's input ("keys"), cached per model.

Why: ROME's rank-one update ΔW = (v* − W k*) (C⁻¹k*)ᵀ / (k*ᵀC⁻¹k*) and MEMIT's ΔW = R Kᵀ (λC + KKᵀ)⁻¹ use
C to spend the change in the directions the model's ordinary keys do not use, which is what keeps
neighbouring facts intact. ROME estimates C on Wikipedia; we have no downloads, so the corpus is local:
the sentences and question/answer pairs of the shipped facts (every template, train and held-out), which
is the text the embedded model was taught. Any other text can be passed instead.

C is computed once per (model fingerprint, corpus) for all layers in one pass and cached as safetensors
under ``$MEMFED_HOME/cache/edit-stats/<fingerprint id>/``; a later process loads it in milliseconds.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from memfed.config import memfed_home
from memfed.cube.fingerprint import fingerprint_model
from memfed.node import facts as facts_mod
from memfed.node.editing.arch import ModelLayout, layout_of
from memfed.node.editing.hooks import record
from memfed.node.editing.text import pad_batch, pad_id

STATS_VERSION = 1
_MEMO: dict[tuple[str, str], dict[int, torch.Tensor]] = {}


def default_corpus() -> list[str]:
    """Local text for the statistics: every fact under every template (statements and questions)."""
    rels = facts_mod.load_relations()
    texts: list[str] = []
    for fact in facts_mod.load_facts():
        rel = rels[fact.relation]
        for split in ("train", "heldout"):
            for template in rel.statements[split]:
                texts.append(facts_mod.statement_sentence(template, fact.subject, fact.target))
            for q in rel.questions[split]:
                texts.append(f"{facts_mod.question_prompt(q.format(subject=fact.subject))} {fact.target}")
    return texts


def corpus_digest(texts: Sequence[str]) -> str:
    h = hashlib.sha256(f"v{STATS_VERSION}".encode())
    for t in texts:
        h.update(hashlib.sha256(t.encode()).digest())
    return h.hexdigest()


def stats_dir() -> Path:
    return memfed_home() / "cache" / "edit-stats"


@torch.no_grad()
def compute_second_moments(
    model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 64
) -> dict[int, torch.Tensor]:
    """E[k kᵀ] per layer over every token of ``texts`` (float32, on CPU)."""
    layout = layout_of(model)
    return _moments(layout, tokenizer, texts, batch_size)


def _moments(
    layout: ModelLayout, tokenizer: Any, texts: Sequence[str], batch_size: int
) -> dict[int, torch.Tensor]:
    model = layout.model
    device = next(model.parameters()).device
    encoded = sorted((tokenizer(t)["input_ids"] for t in texts), key=len)  # similar lengths pad less
    sums = {
        i: torch.zeros(layout.key_dim, layout.key_dim, dtype=torch.float64) for i in range(layout.num_layers)
    }
    count = 0
    modules = {str(i): layout.down(i) for i in range(layout.num_layers)}
    pid = pad_id(tokenizer)
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        batch = pad_batch(chunk, pid, device)
        mask = torch.zeros(batch.ids.shape, dtype=torch.bool, device=device)
        for j, n in enumerate(batch.lengths):
            mask[j, :n] = True
        with record(modules, inputs=True) as seen:
            model(input_ids=batch.ids)
        for i in range(layout.num_layers):
            k = seen[str(i)][mask].double().cpu()
            sums[i] += k.T @ k
        count += int(mask.sum())
    return {i: (s / max(1, count)).float() for i, s in sums.items()}


def second_moments(
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    texts: Sequence[str] | None = None,
    fingerprint_id: str | None = None,
    cache: bool = True,
) -> dict[int, torch.Tensor]:
    """C per layer for ``model`` over ``texts`` (default: ``default_corpus()``), from the cache if there.

    ``fingerprint_id`` saves recomputing the model's fingerprint when the caller has it.
    """
    from safetensors.torch import load_file, save_file

    texts = list(default_corpus() if texts is None else texts)
    fid = fingerprint_id or fingerprint_model(model).fingerprint_id
    digest = corpus_digest(texts)
    memo_key = (fid, digest)
    if memo_key in _MEMO:
        return _MEMO[memo_key]
    path = stats_dir() / fid / f"{digest[:24]}.safetensors"
    moments: dict[int, torch.Tensor] | None = None
    if cache and path.is_file():
        try:
            raw = load_file(str(path))
            moments = {int(k.split(".")[1]): v for k, v in raw.items()}
        except Exception:  # a damaged cache file is recomputed, never trusted
            moments = None
    if moments is None:
        moments = compute_second_moments(model, tokenizer, texts)
        if cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            save_file({f"layer.{i}": c.contiguous() for i, c in moments.items()}, str(tmp))
            os.replace(tmp, path)
    _MEMO[memo_key] = moments
    return moments
