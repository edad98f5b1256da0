"""Edit evaluation: efficacy, generalization, locality and fluency, CounterFact's measures.

Scores are computed on whatever the model currently is (edits written into its weights, run by the node
runtime's hooks, or held in a codebook hook), so one evaluator serves every method and the unedited
baseline. What "before" means is fixed once, at construction, from the unedited model:

- efficacy: on the rewrite prompt the new target is more likely than the true one (mean log-probability
  per token, as CounterFact compares them); ``*_exact``: greedy decoding produces the new target itself;
- generalization: the same on the paraphrase prompts;
- locality: the neighbourhood prompts' greedy answers are unchanged, token for token (as EasyEdit
  measures locality); ``neighborhood_score`` is CounterFact's: each neighbour's own answer still beats
  the new target;
- subject locality: the edited subject's other facts keep their answers;
- fluency: n-gram entropy of greedy generations from the generation prompts (ROME's measure: weighted
  bigram/trigram entropy in bits), reported before and after.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from memfed.node.editing.counterfact import EditCase
from memfed.node.editing.text import Encoded, encode, pad_batch, pad_id, target_logprobs

_BATCH = 96

# An answer path other than the model's own forward (a scoped edit memory, ``memfed.node.editing.scope``):
# logits (b, t, vocab) of a right-padded batch of ids (b, t), given each row's prompt length (what follows
# the prompt is the answer being scored or decoded).
Forward = Callable[[torch.Tensor, Sequence[int]], torch.Tensor]


@dataclass
class CaseScore:
    """Per case: fractions in [0, 1] (None where the case has no such prompts)."""

    case_id: str
    efficacy: float
    efficacy_exact: float
    generalization: float | None
    generalization_exact: float | None
    locality: float | None
    neighborhood_score: float | None
    subject_locality: float | None
    fluency: float | None = None


@dataclass
class _Reference:
    """What the unedited model does on a case's prompts."""

    true: str
    neighbour_answers: list[tuple[int, ...]] = field(default_factory=list)
    subject_answers: list[tuple[int, ...]] = field(default_factory=list)
    fluency: float | None = None


class Evaluator:
    """Scores edit cases against the model's unedited behaviour, recorded when this is constructed."""

    def __init__(
        self, model: torch.nn.Module, tokenizer: Any, cases: Sequence[EditCase], *, fluency: bool = False
    ):
        self.model, self.tokenizer = model, tokenizer
        self.cases = list(cases)
        self.fluency = fluency
        self.device = next(model.parameters()).device
        self.pad = pad_id(tokenizer)
        self.reference: dict[str, _Reference] = {}
        self.forward: Forward | None = None  # see ``routed``; None while the reference is recorded
        missing = [c for c in self.cases if c.target_true is None]
        answers = self._greedy([c.prompt for c in missing], 6)
        true_of = {c.case_id: self._answer_text(a) for c, a in zip(missing, answers, strict=True)}
        n_prompts = [n.prompt for c in self.cases for n in c.neighbours]
        # The unedited model's greedy answer, as many tokens as the expected answer has. The token after
        # it is not compared: an answer that names an edited subject may be followed by new words.
        n_lens = [len(encode(tokenizer, "", None, n.target).target) for c in self.cases for n in c.neighbours]
        s_prompts = [n.prompt for c in self.cases for n in c.subject_probes]
        s_lens = [
            len(encode(tokenizer, "", None, n.target).target) for c in self.cases for n in c.subject_probes
        ]
        n_ans = iter(self._greedy_each(n_prompts, n_lens))
        s_ans = iter(self._greedy_each(s_prompts, s_lens))
        for c in self.cases:
            ref = _Reference(true=c.target_true or true_of[c.case_id])
            ref.neighbour_answers = [next(n_ans) for _ in c.neighbours]
            ref.subject_answers = [next(s_ans) for _ in c.subject_probes]
            if fluency and c.generation_prompts:
                ref.fluency = self._fluency(c.generation_prompts)
            self.reference[c.case_id] = ref

    def true_target(self, case: EditCase) -> str:
        """The answer the edit replaces: the case's target_true, or the unedited model's own answer."""
        return self.reference[case.case_id].true

    @contextmanager
    def routed(self, forward: Forward) -> Iterator[Evaluator]:
        """Score through ``forward`` instead of the model while the block runs: the measures then read
        an answer path that decides per prompt what answers it (a SERAC-style scoped edit memory)."""
        self.forward = forward
        try:
            yield self
        finally:
            self.forward = None

    # -- model calls ---------------------------------------------------------------------------------

    @torch.no_grad()
    def _run(
        self,
        seqs: Sequence[Sequence[int]],
        read: Callable[[int, torch.Tensor], Any],
        prompt_lens: Sequence[int] | None = None,
    ) -> list[Any]:
        """``read(i, logits of sequence i)`` for every sequence, in batches of similar length; only what
        ``read`` returns is kept (a thousand cases' full logits would take gigabytes). ``prompt_lens``:
        where each sequence's prompt ends (needed by a routed answer path only)."""
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        result: list[Any] = [None] * len(seqs)
        for start in range(0, len(order), _BATCH):
            idx = order[start : start + _BATCH]
            batch = pad_batch([seqs[i] for i in idx], self.pad, self.device)
            if self.forward is not None and prompt_lens is not None:
                logits = self.forward(batch.ids, [prompt_lens[i] for i in idx])
            else:
                logits = self.model(input_ids=batch.ids).logits
            for j, i in enumerate(idx):
                result[i] = read(i, logits[j, : len(seqs[i])].float())
        return result

    def _greedy_each(self, prompts: Sequence[str], lengths: Sequence[int]) -> list[tuple[int, ...]]:
        """Greedy continuations, each of its own length (decoded together, cut per prompt)."""
        if not prompts:
            return []
        full = self._greedy(prompts, max(lengths))
        return [tuple(a[:n]) for a, n in zip(full, lengths, strict=True)]

    @torch.no_grad()
    def _greedy(self, prompts: Sequence[str], steps: int) -> list[tuple[int, ...]]:
        if not prompts:
            return []
        seqs = [list(self.tokenizer(p)["input_ids"]) for p in prompts]
        gen: list[list[int]] = [[] for _ in seqs]
        for _ in range(steps):
            nxt = self._run(
                [s + g for s, g in zip(seqs, gen, strict=True)],
                lambda i, lg: int(lg[-1].argmax()),
                [len(s) for s in seqs],
            )
            for g, token in zip(gen, nxt, strict=True):
                g.append(token)
        return [tuple(g) for g in gen]

    def _answer_text(self, ids: Sequence[int]) -> str:
        text = self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()
        word = []
        for ch in text:
            if not (ch.isalnum() or ch in " -'"):
                break
            word.append(ch)
        return "".join(word).strip() or text or "?"

    @torch.no_grad()
    def _fluency(self, prompts: Sequence[str], new_tokens: int = 24) -> float:
        gens = self._greedy(prompts, new_tokens)
        eos = self.tokenizer.eos_token_id
        texts = []
        for p, g in zip(prompts, gens, strict=True):
            ids = list(g)
            if eos in ids:
                ids = ids[: ids.index(eos)]
            texts.append(p + self.tokenizer.decode(ids, skip_special_tokens=True))
        return sum(ngram_entropy(t) for t in texts) / len(texts)

    # -- scoring -------------------------------------------------------------------------------------

    def score(
        self, cases: Sequence[EditCase] | None = None, *, edited: Sequence[str] = ()
    ) -> list[CaseScore]:
        """Score ``cases`` (default: all) on the model as it is now.

        ``edited``: subjects edited on purpose (a batch or a sequence of edits); neighbourhood prompts
        about them are left out of locality, since their answers were meant to change.
        """
        cases = self.cases if cases is None else list(cases)
        skip = [s for s in set(edited) if s]
        items: list[Encoded] = []
        plan: list[tuple[str, int, int]] = []  # (kind, case index, item index)
        for ci, c in enumerate(cases):
            true = self.true_target(c)
            for prompt, kind in [(c.prompt, "rw"), *((p, "para") for p in c.paraphrases)]:
                plan.append((kind + "_new", ci, len(items)))
                items.append(encode(self.tokenizer, prompt, None, c.target_new))
                plan.append((kind + "_true", ci, len(items)))
                items.append(encode(self.tokenizer, prompt, None, true))
            ref = self.reference[c.case_id]
            for n, ans in zip(c.neighbours, ref.neighbour_answers, strict=True):
                if any(s in n.prompt for s in skip):
                    continue
                plan.append(("nb_ans", ci, len(items)))
                items.append(Encoded(tuple(self.tokenizer(n.prompt)["input_ids"]), -1, -1, ans))
                plan.append(("nb_true", ci, len(items)))
                items.append(encode(self.tokenizer, n.prompt, None, n.target))
                plan.append(("nb_new", ci, len(items)))
                items.append(encode(self.tokenizer, n.prompt, None, c.target_new))
            for n, ans in zip(c.subject_probes, ref.subject_answers, strict=True):
                plan.append(("sb_ans", ci, len(items)))
                items.append(Encoded(tuple(self.tokenizer(n.prompt)["input_ids"]), -1, -1, ans))

        def read(i: int, lg: torch.Tensor) -> tuple[float, bool]:
            it = items[i]
            lp = target_logprobs(lg.unsqueeze(0), [it])[0]
            pred = lg[len(it.ids) - 1 : len(it.ids) - 1 + len(it.target)].argmax(-1).tolist()
            return float(lp.mean()), pred == list(it.target)

        reads = self._run([it.ids + it.target[:-1] for it in items], read, [len(it.ids) for it in items])
        mean_lp = [r[0] for r in reads]
        exact = [r[1] for r in reads]
        per: list[dict[str, list[Any]]] = [{} for _ in cases]
        for kind, ci, ii in plan:
            per[ci].setdefault(kind, []).append(ii)
        out = []
        for ci, c in enumerate(cases):
            d = per[ci]

            def beats(a: str, b: str, d: dict[str, list[Any]] = d) -> list[bool]:
                return [mean_lp[x] > mean_lp[y] for x, y in zip(d.get(a, []), d.get(b, []), strict=True)]

            def frac(flags: Sequence[bool]) -> float | None:
                return sum(flags) / len(flags) if flags else None

            rw_exact = [exact[i] for i in d["rw_new"]]
            para_exact = [exact[i] for i in d.get("para_new", [])]
            score = CaseScore(
                case_id=c.case_id,
                efficacy=frac(beats("rw_new", "rw_true")) or 0.0,
                efficacy_exact=frac(rw_exact) or 0.0,
                generalization=frac(beats("para_new", "para_true")),
                generalization_exact=frac(para_exact),
                locality=frac([exact[i] for i in d.get("nb_ans", [])]),
                neighborhood_score=frac(beats("nb_true", "nb_new")),
                subject_locality=frac([exact[i] for i in d.get("sb_ans", [])]),
            )
            if self.fluency and c.generation_prompts:
                score.fluency = self._fluency(c.generation_prompts)
            out.append(score)
        return out


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's generation entropy: mean of weighted n-gram entropies (bits) over whitespace tokens."""
    words = text.split()
    parts = []
    for n, w in zip(ns, weights, strict=True):
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        h = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        parts.append(w * h)
    return sum(parts) / len(parts)


def summarize(scores: Sequence[CaseScore]) -> dict[str, float]:
    """Means over cases of every measure (cases without a measure's prompts are left out of it)."""
    out: dict[str, float] = {"cases": float(len(scores))}
    for name in CaseScore.__dataclass_fields__:
        if name == "case_id":
            continue
        values = [getattr(s, name) for s in scores if getattr(s, name) is not None]
        if values:
            out[name] = round(sum(values) / len(values), 4)
    return out


def fluency_before(evaluator: Evaluator, cases: Sequence[EditCase]) -> float | None:
    values = [evaluator.reference[c.case_id].fluency for c in cases]
    known = [v for v in values if v is not None]
    return round(sum(known) / len(known), 4) if known else None
