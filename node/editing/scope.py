"""SERAC-style scoped editing (Mitchell et al., 2022): an edit memory, a scope classifier, no training.

An edit is a record (prompt, subject, new answer) in a memory; the base model is never changed. For an
incoming prompt the scope classifier finds the edit it falls under, if any: prompts in scope are
answered by the counterfactual path (``memfed.node.editing.scope_path``), every other prompt by the
untouched base model. Adding an edit is adding a record and its key vector: milliseconds, no backward
pass, and 1,000 edits do not erode anything the model knew, because a prompt the classifier leaves out
of scope runs the base model exactly.

The scope decision has two stages, each a similarity in [0, 1] with its own threshold:

1. **Subject**: which edits the prompt is *about*. An edit's key is its subject's hashed character
   n-grams, IDF-weighted and normalized to sum 1 (``scope_embed``); a prompt is embedded as the set of
   its n-grams; the similarity is their dot product: the IDF-weighted share of the subject's n-grams
   that occur in the prompt (1.0 when the prompt names the subject verbatim, whatever else it says).
2. **Relation**: whether it asks the edited *question*. A relation score compares the prompt with each
   candidate's edit prompt through the base model (``ScopedModel.relate``: the overlap of their
   next-token distributions, averaged with the cosine of an early layer's hidden state at the last
   token); the candidate scoring highest is the match if it reaches ``relation_threshold``, otherwise
   the prompt is out of scope. So "The official language of X is" stays with the base model when only
   X's capital was edited, and among several edits of one subject the one asking the same question
   answers.

Why the subject and not the whole prompt for stage 1: measured on the train split with 1,000 edits in
memory (``memfed.bench.evolve_scope`` reports these figures), the cosine of whole-prompt TF-IDF vectors
does not separate at all (paraphrases to their own edit: median 0.53; neighbours, same relation and
other subject, to their nearest edit: median 0.56), since a neighbour shares the edit prompt's wording
and a paraphrase shares only the name. Subject coverage separates them completely: every paraphrase 1.0,
the highest neighbour 0.64 to 0.74 (a name sharing a long part with an edited one: "Steitaern Holdings"
/ "Teitern Holdings"). The threshold is calibrated on the train split (``calibrate_threshold``) in that
gap (0.82 in the bench); on the test split at 1,000 edits no neighbourhood prompt reached it.

Why the base model for stage 2: a paraphrase and a question about another relation differ in wording
by as much as they differ from each other ("In X, people speak" / "The language of X is" share no
content word), but the model reads the same question into both: same question, same expected answer.
Measured on the train split (paraphrases and insertions' paraphrases against their edit; the same
subject's other facts against it): next-token overlap alone keeps 0.81 of known subjects' paraphrases
and 0.65 of inserted subjects' (whose answer the model does not know) above the highest other-fact
score; averaged with the layer-1 hidden-state cosine (how the model reads the question before
recalling an answer), 0.85 and 0.81; subject-masked template TF-IDF, 0.17 and 0.15. The relation
threshold is calibrated like the subject threshold (``calibrate_relation``; 0.24 in the bench) and
stored with the memory, with the layer it reads (``relation_depth``), so a stored cube decides the same.
On the test split at 1,000 edits (``memfed.bench.evolve_scope``) no other fact of an edited subject
reaches it (subject locality 1.0, against 0.0 for the subject classifier alone), at a price in recall
(0.85 of rewrite and paraphrase prompts, 0.98 with the gate open). What is lost, and what still goes to
a subject's other edit, are held-out wordings the embedded model itself reads as another question
("X has a job at" continued with "."; "What does X do for a living?" answered with an employer): no
similarity the model computes can place them right without letting other facts in.

Without a model (``EditMemory.match_many`` with no ``relate``) only stage 1 runs, and among several
edits of one subject the TF-IDF cosine of the whole prompts picks: a subject classifier, not the scope.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from memfed.errors import InvalidArgumentError
from memfed.node.editing.counterfact import EditCase
from memfed.node.editing.scope_embed import NgramEmbedder, NgramSpec, default_embedder
from memfed.node.editing.value import EditRequest

DEFAULT_THRESHOLD = 0.9  # replaced by the calibrated one when a memory is built by the bench or CLI
# Replaced by the calibrated one too; 0.25 is near what the bench calibrates on the embedded model.
DEFAULT_RELATION_THRESHOLD = 0.25
# The relation gate reads the hidden state a quarter of the way up (layer 1 of the embedded model's 4):
# measured on the train split, early layers carry the question's form, late ones the recalled answer.
DEFAULT_RELATION_DEPTH = 0.25
MAX_FPR = 0.001  # calibration: at most this share of negatives may reach the threshold

# ``relate(prompt, candidate edit indices)``: the relation score of the prompt to each candidate, in [0, 1].
Relate = Callable[[str, list[int]], Sequence[float]]


def check_threshold(threshold: Any, what: str = "scope threshold") -> float:
    """``threshold`` as a float in [0, 1]; InvalidArgumentError otherwise (``what`` names it)."""
    if isinstance(threshold, bool) or not isinstance(threshold, int | float):
        raise InvalidArgumentError(
            f"the {what} must be a number, got {type(threshold).__name__}",
            hint="give a similarity between 0 and 1",
        )
    value = float(threshold)
    if not 0.0 <= value <= 1.0:  # also refuses NaN
        raise InvalidArgumentError(
            f"the {what} must lie in [0, 1], got {threshold}",
            hint="similarities are in [0, 1]: 1 admits only prompts identical to the edit's in that respect",
        )
    return value


def check_depth(depth: Any) -> float:
    """``depth`` (the relation gate's layer, as a share of the model's layers) as a float in (0, 1]."""
    if isinstance(depth, bool) or not isinstance(depth, int | float) or not 0.0 < float(depth) <= 1.0:
        raise InvalidArgumentError(
            f"the relation depth must be a number in (0, 1], got {depth!r}",
            hint="0.25 reads the hidden state a quarter of the way up the model, 1 its last layer",
        )
    return float(depth)


@dataclass(frozen=True)
class ScopeMatch:
    """The edit a prompt falls under: its index in the memory, the similarity, and the record."""

    entry: int
    similarity: float
    record: dict[str, Any]
    relation: float | None = None  # the relation score; None when no relation gate decided

    @property
    def target(self) -> str:
        return str(self.record["target"])


class EditMemory:
    """Edit records and their subject keys (sparse: bucket ids and weights per edit), plus the gate
    settings: subject threshold, relation threshold and the layer the relation gate reads.

    Editing the same subject with the same prompt again replaces the earlier record (the newer answer
    wins); anything else is a new record.
    """

    def __init__(
        self,
        embedder: NgramEmbedder | None = None,
        threshold: float = DEFAULT_THRESHOLD,
        *,
        relation_threshold: float = DEFAULT_RELATION_THRESHOLD,
        relation_depth: float = DEFAULT_RELATION_DEPTH,
    ) -> None:
        self._threshold = check_threshold(threshold)
        self._relation_threshold = check_threshold(relation_threshold, "relation threshold")
        self.relation_depth = check_depth(relation_depth)  # fixed for a memory: its threshold depends on it
        self.embedder = embedder or default_embedder()
        self.records: list[dict[str, Any]] = []
        self._keys: list[tuple[torch.Tensor, torch.Tensor]] = []  # per record: (bucket ids, weights)
        self._packed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._prompt_vectors: torch.Tensor | None = None

    # -- contents -------------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return len(self.records)

    @property
    def threshold(self) -> float:
        return self._threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        self._threshold = check_threshold(value)  # checked first: a bad value changes nothing

    @property
    def relation_threshold(self) -> float:
        return self._relation_threshold

    @relation_threshold.setter
    def relation_threshold(self, value: float) -> None:
        self._relation_threshold = check_threshold(value, "relation threshold")

    def subject_key(self, subject: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The subject's key: its n-gram buckets and IDF weights summing to 1."""
        ids = torch.tensor(sorted(self.embedder.spec.counts(subject)), dtype=torch.long)
        if ids.numel() == 0:
            raise InvalidArgumentError(
                f"the subject {subject!r} has no letters or digits to match on",
                hint="name the entity the fact is about",
            )
        weights = self.embedder.idf[ids]
        return ids, weights / weights.sum()

    def add(self, request: EditRequest) -> int:
        """Add (or replace, for the same subject and prompt) one edit; returns its index. No training."""
        if not request.subject.strip() or request.subject not in request.prompt:
            raise InvalidArgumentError(
                f"subject {request.subject!r} does not occur in the prompt {request.prompt!r}",
                hint="the subject must appear in the prompt exactly as written",
            )
        if not request.target.strip():
            raise InvalidArgumentError("the new answer is empty", hint="give the answer the edit teaches")
        key = self.subject_key(request.subject)
        rec = request.to_record()
        for i, old in enumerate(self.records):
            if old["subject"] == request.subject and old["prompt"] == request.prompt:
                self.records[i], self._keys[i] = rec, key
                self._changed()
                return i
        self.records.append(rec)
        self._keys.append(key)
        self._changed()
        return len(self.records) - 1

    def _changed(self) -> None:
        self._packed = None
        self._prompt_vectors = None

    def _pack(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(bucket ids, weights, owning record) of every key, concatenated: one gather scores all."""
        if self._packed is None:
            ids = torch.cat([k[0] for k in self._keys]) if self._keys else torch.zeros(0, dtype=torch.long)
            weights = torch.cat([k[1] for k in self._keys]) if self._keys else torch.zeros(0)
            owner = torch.cat(
                [torch.full((len(k[0]),), i, dtype=torch.long) for i, k in enumerate(self._keys)]
            ) if self._keys else torch.zeros(0, dtype=torch.long)  # fmt: skip
            self._packed = (ids, weights, owner)
        return self._packed

    # -- the classifier -------------------------------------------------------------------------------

    def presence(self, prompts: Sequence[str]) -> torch.Tensor:
        """(len(prompts), dim) 0/1: which n-gram buckets each prompt contains (its query embedding)."""
        out = torch.zeros(len(prompts), self.embedder.spec.dim)
        for row, prompt in enumerate(prompts):
            ids = list(self.embedder.spec.counts(prompt))
            if ids:
                out[row, torch.tensor(ids)] = 1.0
        return out

    def similarities(self, prompts: Sequence[str]) -> torch.Tensor:
        """(len(prompts), size): each prompt's similarity to each edit (see the module docstring)."""
        ids, weights, owner = self._pack()
        hits = self.presence(prompts)[:, ids] * weights  # (prompts, total key buckets)
        return torch.zeros(len(prompts), self.size).index_add_(1, owner, hits).clamp_(0.0, 1.0)

    def match_many(self, prompts: Sequence[str], relate: Relate | None = None) -> list[ScopeMatch | None]:
        """Per prompt: the edit it falls under, or None (out of scope: the base model answers).

        ``relate`` is the relation gate (``ScopedModel.relate``): among the edits whose subject the
        prompt names, the one it relates to best, if that reaches ``relation_threshold``. Without it
        only the subject decides (see the module docstring)."""
        if not prompts:
            return []
        if not self.records:
            return [None] * len(prompts)
        sims = self.similarities(prompts)
        out: list[ScopeMatch | None] = []
        for row, prompt in enumerate(prompts):
            inside = (sims[row] >= self._threshold).nonzero().flatten()
            if inside.numel() == 0:
                out.append(None)
                continue
            if relate is not None:
                scores = torch.tensor([float(x) for x in relate(prompt, inside.tolist())])
                top = int(scores.argmax())
                if float(scores[top]) < self._relation_threshold:
                    out.append(None)  # names an edited subject but asks another question
                    continue
                best = int(inside[top])
                out.append(ScopeMatch(best, float(sims[row, best]), self.records[best], float(scores[top])))
                continue
            best = int(inside[0])
            if inside.numel() > 1:  # one subject edited several times: the most similar prompt answers
                query = self.embedder.embed([prompt])[0]
                cos = self._prompts()[inside] @ query + sims[row, inside]
                best = int(inside[int(cos.argmax())])
            out.append(ScopeMatch(best, float(sims[row, best]), self.records[best]))
        return out

    def match(self, prompt: str) -> ScopeMatch | None:
        return self.match_many([prompt])[0]

    def _prompts(self) -> torch.Tensor:
        if self._prompt_vectors is None:
            self._prompt_vectors = self.embedder.embed([r["prompt"] for r in self.records])
        return self._prompt_vectors

    # -- serialization (the ``scope`` form of an edit cube, ``memfed.node.editing.cubes``) ------------

    def tensors(self) -> dict[str, torch.Tensor]:
        """The payload: IDF table, keys in CSR form (ids, weights, offsets) and the records as UTF-8."""
        ids, weights, _ = self._pack()
        offsets = torch.tensor([0, *torch.tensor([len(k[0]) for k in self._keys]).cumsum(0).tolist()])
        text = json.dumps(self.records, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return {
            "idf": self.embedder.idf.float(),
            "key_ids": ids.to(torch.int32),
            "key_weights": weights.float(),
            "key_offsets": offsets.to(torch.int64),
            "records_utf8": torch.frombuffer(bytearray(text), dtype=torch.uint8),
        }

    def metadata(self) -> dict[str, str]:
        return {
            "threshold": repr(self._threshold),
            "relation_threshold": repr(self._relation_threshold),
            "relation_depth": repr(self.relation_depth),
            **self.embedder.spec.as_metadata(),
        }

    @classmethod
    def from_parts(cls, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> EditMemory:
        """Rebuild from payload tensors and header metadata; malformed input raises InvalidArgumentError."""
        missing = {"idf", "key_ids", "key_weights", "key_offsets", "records_utf8"} - set(tensors)
        if missing:
            raise InvalidArgumentError(f"the edit memory lacks tensors {sorted(missing)}")
        # A memory stored before the relation gate existed has no relation settings: it is read with the
        # gate open (threshold 0), so it decides as it did when it was stored.
        try:
            threshold = float(meta.get("threshold", ""))
            relation = float(meta.get("relation_threshold", "0"))
            depth = float(meta.get("relation_depth", repr(DEFAULT_RELATION_DEPTH)))
        except ValueError:
            raise InvalidArgumentError("the edit memory's thresholds are unreadable") from None
        spec = NgramSpec.from_metadata(meta)
        memory = cls(
            NgramEmbedder(spec, tensors["idf"].float()),
            threshold,
            relation_threshold=relation,
            relation_depth=depth,
        )
        try:
            records = json.loads(bytes(tensors["records_utf8"].to(torch.uint8).tolist()).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise InvalidArgumentError(f"the edit memory's records are not UTF-8 JSON ({exc})") from None
        offsets = tensors["key_offsets"].tolist()
        ids, weights = tensors["key_ids"].long(), tensors["key_weights"].float()
        ok = isinstance(records, list) and len(offsets) == len(records) + 1 and offsets[-1] == len(ids)
        if not ok or len(weights) != len(ids) or bool((ids < 0).any() | (ids >= spec.dim).any()):
            raise InvalidArgumentError("the edit memory's keys do not match its records")
        for i, rec in enumerate(records):
            if not isinstance(rec, dict) or not {"prompt", "subject", "target"} <= set(rec):
                raise InvalidArgumentError(f"edit memory record {i} lacks prompt, subject or target")
            memory.records.append(rec)
            memory._keys.append((ids[offsets[i] : offsets[i + 1]], weights[offsets[i] : offsets[i + 1]]))
        return memory


def separating_threshold(
    pos: torch.Tensor, neg: torch.Tensor, *, max_fpr: float = MAX_FPR, what: str = "scope threshold"
) -> tuple[float, dict[str, float]]:
    """The threshold between positive scores (must reach it) and negative ones (must not), and figures.

    It is the midpoint between the highest negative allowed by ``max_fpr`` and the lowest positive above
    it: as far from both as the data allow."""
    if not pos.numel() or not neg.numel():
        raise InvalidArgumentError("calibration needs positive and negative prompts")
    high = float(torch.quantile(neg, 1.0 - max_fpr))
    above = pos[pos > high]
    threshold = (high + float(above.min())) / 2 if above.numel() else min(1.0, high + 1e-6)
    threshold = min(1.0, max(0.0, threshold))
    figures = {
        "threshold": round(threshold, 4),
        "recall": round(float((pos >= threshold).float().mean()), 4),
        "false_positive_rate": round(float((neg >= threshold).float().mean()), 5),
        "highest_negative": round(float(neg.max()), 4),
        "lowest_positive": round(float(pos.min()), 4),
    }
    return check_threshold(threshold, what), figures


def calibrate_threshold(
    memory: EditMemory,
    positives: Sequence[tuple[str, int]],
    negatives: Sequence[str],
    *,
    max_fpr: float = MAX_FPR,
) -> tuple[float, dict[str, float]]:
    """The subject threshold separating ``positives`` (prompt, index of the edit it belongs to:
    paraphrases) from ``negatives`` (prompts that must stay out of scope: neighbours, other subjects).

    A negative is scored against every edit whose subject it does not name (an edit about the
    neighbour's own subject is rightly in scope)."""
    if not positives or not negatives:
        raise InvalidArgumentError("calibration needs positive and negative prompts")
    pos_sims = memory.similarities([p for p, _ in positives])
    pos = torch.tensor([float(pos_sims[r, i]) for r, (_, i) in enumerate(positives)])
    neg_sims = memory.similarities(list(negatives))
    subjects = [r["subject"] for r in memory.records]
    own = torch.tensor([[s in prompt for s in subjects] for prompt in negatives])
    return separating_threshold(pos, neg_sims.masked_fill(own, 0.0).max(1).values, max_fpr=max_fpr)


def calibrate_relation(
    relate: Relate,
    positives: Sequence[tuple[str, int]],
    negatives: Sequence[tuple[str, int]],
    *,
    max_fpr: float = MAX_FPR,
) -> tuple[float, dict[str, float]]:
    """The relation threshold separating ``positives`` (prompt, its edit: rewrite and paraphrases) from
    ``negatives`` (prompt, an edit of the subject it names that it must not fall under: the subject's
    other facts), each scored against that one edit by ``relate``."""
    if not positives or not negatives:
        raise InvalidArgumentError("calibration needs positive and negative prompts")
    pos = torch.tensor([float(relate(p, [i])[0]) for p, i in positives])
    neg = torch.tensor([float(relate(p, [i])[0]) for p, i in negatives])
    return separating_threshold(pos, neg, max_fpr=max_fpr, what="relation threshold")


def calibrate_on_cases(
    memory: EditMemory, cases: Sequence[EditCase], relate: Relate | None = None
) -> dict[str, float]:
    """Add ``cases`` to ``memory`` and calibrate it on their prompts; returns the figures. Use training
    cases (``split_cases``' first part).

    Subject threshold (``calibrate_threshold``): rewrite and paraphrase prompts as positives,
    neighbourhood prompts as negatives. Relation threshold, when ``relate`` is given
    (``calibrate_relation``; figures prefixed ``relation_``): rewrite and paraphrase prompts against
    their edit as positives, the subject's other facts (``EditCase.subject_probes``) against it as
    negatives."""
    index = {c.case_id: memory.add(c.request()) for c in cases}
    positives = [(p, index[c.case_id]) for c in cases for p in (c.prompt, *c.paraphrases)]
    negatives = [n.prompt for c in cases for n in c.neighbours]
    memory.threshold, figures = calibrate_threshold(memory, positives, negatives)
    if relate is not None:
        others = [(n.prompt, index[c.case_id]) for c in cases for n in c.subject_probes]
        memory.relation_threshold, rel = calibrate_relation(relate, positives, others)
        figures.update({f"relation_{k}": v for k, v in rel.items()})
    return figures


def timed_add(memory: EditMemory, requests: Sequence[EditRequest]) -> float:
    """Add ``requests`` one by one; milliseconds per edit (the bench's ``serac_ms_per_edit``)."""
    t0 = time.perf_counter()
    for req in requests:
        memory.add(req)
    return (time.perf_counter() - t0) * 1000.0 / max(1, len(requests))
