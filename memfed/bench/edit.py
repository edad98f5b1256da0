"""``memfed bench edit``: fact editing on the embedded model, CounterFact-style.

Parts (all on ``node/data/counterfact.jsonl`` unless said otherwise, on one CPU thread: see below):

* single edits (ROME): each case edited alone on the unedited model, scored, undone. Efficacy,
  generalization (held-out paraphrases), locality (neighbours' greedy answers unchanged), CounterFact's
  neighbourhood score, subject locality (the subject's other facts), fluency, seconds per edit. The
  faithful variant (key at the subject's last token only) is reported beside ours (every subject token).
* batch edit (MEMIT): the same cases as one edit over two layers; its locality leaves out neighbours that
  are themselves in the batch.
* 1,000 sequential codebook edits (GRACE): 300 of the shipped cases and 700 insertions of facts about
  invented subjects (``novel_cases``), one after another into one codebook, scored at the end:
  reliability (efficacy of every edit after all of them), generalization, locality (neighbours not
  edited themselves), and ``untouched_facts_unchanged``: the answers of the facts whose subject was not
  edited at all, on all their trained templates.
* baseline: a PEFT LoRA fine-tuned on the one fact (``memfed.node.editing.finetune`` names the
  settings), on a subset of the single cases.

Threads: the bench runs torch on one thread. This machine's two cores are shared, and a 1M-parameter
model's matrices are too small to split: with other work on the second core, two threads ran a forward
pass 50x slower than one (OpenMP workers wait on each other). The setting is restored afterwards.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from typing import Any

from memfed.bench.harness import BenchResult, one_torch_thread
from memfed.node.editing import protocols
from memfed.node.editing.counterfact import EditCase, load_cases, novel_cases
from memfed.node.editing.editor import Editor
from memfed.node.editing.finetune import FinetuneConfig

SIZES = {
    # part: (quick, full)
    "single": (12, 200),
    "rome_last": (0, 50),
    "memit": (12, 100),
    "finetune": (3, 40),
    "seq_known": (40, 300),
    "seq_novel": (20, 700),
}


def _size(part: str, quick: bool) -> int:
    return SIZES[part][0 if quick else 1]


def _pick(cases: Sequence[EditCase], n: int, seed: int) -> list[EditCase]:
    rng = random.Random(seed)
    return rng.sample(list(cases), min(n, len(cases)))


def _prefixed(prefix: str, summary: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}_{k}": v for k, v in summary.items() if k != "cases"}


def _untouched_probes(cases: list[EditCase]) -> list[EditCase]:
    """The untouched facts as probe cases: every prompt of theirs is a 'neighbour' whose answer must stay."""
    from memfed.node import facts as facts_mod
    from memfed.node.editing.counterfact import Probe

    by_id = {f.id: f for f in facts_mod.load_facts()}
    out = []
    for c in cases:
        fact = by_id.get(str(c.extra.get("fact_id")))
        prompts = fact.prompts("train") if fact is not None else [c.prompt]
        out.append(
            EditCase(
                c.case_id,
                c.prompt,
                c.subject,
                c.target_new,
                c.target_true,
                c.relation,
                neighbours=tuple(Probe(p, c.target_true or "") for p in prompts),
            )
        )
    return out


def run(*, quick: bool = False) -> BenchResult:
    from memfed.node.models import default_model_dir, load_host_model

    with one_torch_thread():
        return _run(quick, load_host_model(default_model_dir()))


def _run(quick: bool, loaded: tuple[Any, Any]) -> BenchResult:
    model, tokenizer = loaded
    for p in model.parameters():
        p.requires_grad_(False)
    t_start = time.perf_counter()
    editor = Editor(model, tokenizer)
    t0 = time.perf_counter()
    editor.second_moments  # noqa: B018 - computed (or loaded from the cache) once, timed here
    stats_seconds = time.perf_counter() - t0
    cases = load_cases()
    single = _pick(cases, _size("single", quick), seed=1)
    layer = editor.choose_layer([c.request() for c in single[:4]], "all")
    metrics: dict[str, float] = {"layer": float(layer), "stats_seconds": round(stats_seconds, 2)}

    rome = protocols.single_edits(editor, single, layer, token="all", fluency=not quick)
    metrics.update(
        single_efficacy=rome["efficacy"],
        single_generalization=rome.get("generalization", 0.0),
        single_locality=rome.get("locality", 1.0),
        single_cases=float(len(single)),
    )
    metrics.update(
        _prefixed(
            "single", {k: v for k, v in rome.items() if k not in ("efficacy", "generalization", "locality")}
        )
    )
    if _size("rome_last", quick):
        last = protocols.single_edits(editor, single[: _size("rome_last", quick)], layer, token="last")
        metrics.update(_prefixed("rome_last", last))

    batch = single[: _size("memit", quick)]
    metrics.update(_prefixed("memit", protocols.batch_edit(editor, batch, layer)))
    metrics["memit_cases"] = float(len(batch))

    finetune = protocols.finetune_edits(editor, single[: _size("finetune", quick)])
    metrics.update(_prefixed("finetune", finetune))

    shuffled = _pick(cases, len(cases), seed=2)
    known = shuffled[: _size("seq_known", quick)]
    edited_subjects = {c.subject for c in known}
    spare = [c for c in shuffled[len(known) :] if c.subject not in edited_subjects]
    stream = known + novel_cases(_size("seq_novel", quick))
    random.Random(11).shuffle(stream)
    checkpoints = [len(stream) // 4, len(stream) // 2]
    seq = protocols.sequential_codebook(
        editor, stream, layer, untouched=_untouched_probes(spare), checkpoints=checkpoints
    )
    n = int(seq["edits"])
    tag = "seq1000" if n == 1000 else f"seq{n}"
    seq["reliability"] = seq.pop("efficacy")
    seq["reliability_exact"] = seq.pop("efficacy_exact")
    at = {k: seq.pop(k) for k in list(seq) if k.startswith("at")}
    metrics.update({f"{tag}_{k}": v for k, v in seq.items() if k != "cases"})
    if tag != "seq1000":  # quick runs: the headline keys still exist, from the smaller run
        for k in ("reliability", "generalization", "locality"):
            metrics[f"seq1000_{k}"] = seq.get(k, 0.0)
    metrics["total_seconds"] = round(time.perf_counter() - t_start, 1)

    baseline = {
        "finetune": FinetuneConfig().describe(),
        "threads": 1,
        "cases_file": "node/data/counterfact.jsonl",
        "sequential_stream": f"{len(known)} shipped cases + {n - len(known)} new-subject facts, shuffled",
    }
    ratios = {}
    if finetune["seconds_per_edit"] > 0:
        ratios["rome_seconds_vs_finetune"] = round(rome["seconds_per_edit"] / finetune["seconds_per_edit"], 3)
        ratios["codebook_seconds_vs_finetune"] = round(
            seq["seconds_per_edit"] / finetune["seconds_per_edit"], 3
        )
    # The report's "metrics vs sequential edits" plot: the edits so far scored at each checkpoint, then all.
    points = [c for c in checkpoints if f"at{c}_efficacy" in at]
    series = {
        "sequential": {
            "edits": [*points, n],
            "reliability": [*(at[f"at{c}_efficacy"] for c in points), seq.get("reliability", 0.0)],
            **{
                k: [*(at.get(f"at{c}_{k}", 0.0) for c in points), seq.get(k, 0.0)]
                for k in ("generalization", "locality")
            },
        }
    }
    return BenchResult(metrics=metrics, baseline=baseline, ratios=ratios, series=series)
