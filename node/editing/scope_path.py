"""The scoped answer path: prompts in an edit's scope take the counterfactual path, all others the base model.

``ScopedModel`` is both an ``Evaluator`` forward (``Evaluator.routed``: logits of a padded batch, given
where each row's prompt ends) and a text answerer (``answer``). The scope decision is made on the prompt
alone (decoded from its ids, memoized per prompt), never on the answer being scored, so the measures
read what a user asking that prompt would get. It is the memory's subject classifier followed by the
relation gate (``relate``, which needs the base model and so lives here): a prompt naming an edited
subject but asking another of its facts is answered by the base model, whichever path is chosen.

Two counterfactual paths, both measured on the embedded model (``memfed.bench.evolve_scope``):

- ``"answer"`` (default): the matched edit's stored answer. At the answer's positions the new target's
  tokens get the top logit (a margin above the base model's best), as long as the text so far follows
  the target; after it the base model continues. Efficacy and generalization are those of the scope
  decision itself (every in-scope prompt answers the new target).
- ``"context"``: the base model with the matched edit stated in front of the prompt
  ("Passage: <edit prompt> <new answer>.\\n"), optionally steered toward following the passage
  (``memfed.node.conversion.steering``'s context-faithfulness vector). This small model reads only the
  open-book question format it was taught and rarely follows a passage that contradicts what it
  memorized, so its efficacy is far below the stored answer's. On the 113 test cases with 1,000 edits in
  memory (relation gate on): in context, efficacy 0.41 / generalization 0.41; steered, 0.43 / 0.43;
  stored answer, 1.00 / 0.85 (locality 1.0 for all three). Hence the default is the stored answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any, Literal

import torch

from memfed.errors import InvalidArgumentError
from memfed.node.editing.scope import EditMemory, ScopeMatch
from memfed.node.editing.text import pad_batch, pad_id, target_ids

CounterfactualPath = Literal["answer", "context"]
MARGIN = 12.0  # nats above the base model's best logit: the stored answer's token has p ≈ 1


def context_passage(match: ScopeMatch) -> str:
    """The matched edit, stated as a passage in the model's open-book format."""
    return f"Passage: {match.record['prompt']} {match.target}.\n"


class ScopedModel:
    """The base model behind an edit memory (see the module docstring)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        memory: EditMemory,
        *,
        path: CounterfactualPath = "answer",
        steering: Any | None = None,
    ) -> None:
        if path not in ("answer", "context"):
            raise InvalidArgumentError(f"unknown counterfactual path {path!r}", hint="use answer or context")
        self.model, self.tokenizer, self.memory = model, tokenizer, memory
        self.path, self.steering = path, steering
        self._decisions: dict[tuple[int, ...], ScopeMatch | None] = {}
        self._features_of: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # per edit prompt

    def clear(self) -> None:
        """Forget memoized scope decisions (after the memory or its thresholds changed)."""
        self._decisions.clear()
        self._features_of.clear()

    def decide(self, prompts: Sequence[Sequence[int]]) -> list[ScopeMatch | None]:
        """The scope decision for each prompt (token ids), memoized."""
        keys = [tuple(int(t) for t in p) for p in prompts]
        todo = sorted({k for k in keys if k not in self._decisions})
        if todo:
            texts = [self.tokenizer.decode(list(k), skip_special_tokens=True) for k in todo]
            for k, m in zip(todo, self.memory.match_many(texts, self.relate), strict=True):
                self._decisions[k] = m
        return [self._decisions[k] for k in keys]

    def relate(self, prompt: str, candidates: list[int]) -> list[float]:
        """The relation gate: how far ``prompt`` asks what each candidate edit's prompt asks, in [0, 1].

        The mean of two base-model similarities at the prompts' last token: the overlap of their
        next-token distributions (Bhattacharyya coefficient: both expect the same answer, which decides
        for subjects the model knows) and the cosine of their hidden states at ``memory.relation_depth``
        (how the model reads the question before it recalls an answer, which still decides for inserted
        subjects whose answer it does not know). ``memfed.node.editing.scope`` gives the figures."""
        texts = [self.memory.records[i]["prompt"] for i in candidates]
        probs, hidden = self._features([prompt, *texts], cache_from=1)
        overlap = (probs[1:] * probs[0]).sqrt().sum(-1)
        cosine = torch.nn.functional.cosine_similarity(hidden[1:], hidden[:1], dim=-1)
        return ((overlap + cosine) / 2).clamp(0.0, 1.0).tolist()

    @torch.no_grad()
    def _features(self, texts: Sequence[str], cache_from: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(next-token distributions, hidden states at the relation layer) after each text's last token.
        Texts from index ``cache_from`` on (edit prompts) are cached: they recur for every prompt that
        names their subject."""
        todo = list(
            dict.fromkeys(t for i, t in enumerate(texts) if i < cache_from or t not in self._features_of)
        )
        fresh: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if todo:
            seqs = [list(self.tokenizer(t)["input_ids"]) for t in todo]
            device = next(self.model.parameters()).device
            out = self.model(
                input_ids=pad_batch(seqs, pad_id(self.tokenizer), device).ids, output_hidden_states=True
            )
            layers = len(out.hidden_states) - 1  # hidden_states[0] is the embedding output
            hidden = out.hidden_states[min(layers, max(1, round(self.memory.relation_depth * layers)))]
            for i, (t, seq) in enumerate(zip(todo, seqs, strict=True)):
                fresh[t] = (out.logits[i, len(seq) - 1].float().softmax(-1), hidden[i, len(seq) - 1].float())
        for t in texts[cache_from:]:
            if t in fresh:
                self._features_of[t] = fresh[t]
        rows = [fresh[t] if t in fresh else self._features_of[t] for t in texts]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, prompt_lens: Sequence[int]) -> torch.Tensor:
        """Logits (b, t, vocab) of right-padded ``ids`` whose row r's prompt is its first prompt_lens[r]."""
        logits = self.model(input_ids=ids).logits.clone()
        matches = self.decide([ids[r, :n].tolist() for r, n in enumerate(prompt_lens)])
        rows = [(r, m) for r, m in enumerate(matches) if m is not None]
        if not rows:
            return logits
        if self.path == "answer":
            for r, m in rows:
                self._force(logits[r], ids[r].tolist(), prompt_lens[r], m)
        else:
            self._in_context(logits, ids, rows)
        return logits

    def _force(self, logits: torch.Tensor, row: list[int], n: int, match: ScopeMatch) -> None:
        """Give the stored answer's tokens the top logit where the row so far follows the answer."""
        target = target_ids(self.tokenizer, match.target)
        for j, tok in enumerate(target):
            pos = n - 1 + j
            if pos >= logits.shape[0] or row[n : n + j] != list(target[:j]):
                break
            logits[pos, tok] = logits[pos].max() + MARGIN

    def _in_context(
        self, logits: torch.Tensor, ids: torch.Tensor, rows: list[tuple[int, ScopeMatch]]
    ) -> None:
        """Rerun the in-scope rows with their edit in front; their logits replace the base model's."""
        bos = self.tokenizer.bos_token_id
        seqs, skips = [], []
        for r, m in rows:
            row = ids[r].tolist()
            skip = 1 if bos is not None and row and row[0] == bos else 0  # the context brings its own BOS
            ctx = list(self.tokenizer(context_passage(m))["input_ids"])
            seqs.append(ctx + row[skip:])
            skips.append((skip, len(ctx) - skip))
        batch = pad_batch(seqs, pad_id(self.tokenizer), ids.device)
        from memfed.node.conversion.steering import steered  # conversion imports editing: import here

        with steered(self.model, self.steering) if self.steering is not None else nullcontext():
            out = self.model(input_ids=batch.ids).logits
        width = ids.shape[1]
        for i, ((r, _), (skip, off)) in enumerate(zip(rows, skips, strict=True)):
            # row position p sits at off + p in the rerun; a leading BOS keeps the base model's logits
            logits[r, skip:width] = out[i, off + skip : off + width].to(logits)

    @torch.no_grad()
    def answer(self, prompt: str, max_tokens: int = 8) -> str:
        """The answer a user asking ``prompt`` gets: in scope on the stored-answer path, the edit's answer;
        otherwise greedy decoding through the path, cut at the first punctuation or line end (as
        ``Editor.answer``)."""
        device = next(self.model.parameters()).device
        ids = list(self.tokenizer(prompt)["input_ids"])
        if self.path == "answer":
            [match] = self.decide([ids])
            if match is not None:  # in scope: the answer is the stored one, whole
                return match.target
        out: list[int] = []
        for _ in range(max_tokens):
            logits = self(torch.tensor([ids + out], device=device), [len(ids)])
            nxt = int(logits[0, -1].argmax())
            if nxt == self.tokenizer.eos_token_id:
                break
            out.append(nxt)
            if any(ch in self.tokenizer.decode(out, skip_special_tokens=True) for ch in ".,;!?\n"):
                break
        text = self.tokenizer.decode(out, skip_special_tokens=True)
        for ch in ".,;!?\n":
            text = text.split(ch)[0]
        return text.strip()


def scoped_answer(model: torch.nn.Module, tokenizer: Any, memory: EditMemory, prompt: str) -> str:
    """What the model answers after ``prompt`` with ``memory``'s edits in effect (stored-answer path)."""
    return ScopedModel(model, tokenizer, memory).answer(prompt)
