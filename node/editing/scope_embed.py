"""The scope classifier's sentence embedding: hashed character n-grams weighted by TF-IDF.

Why this and not a sentence-embedding model: nothing may be downloaded, and what decides whether a prompt
falls under an edit is mostly *which entity it names*. An edit's paraphrases share the subject's name with
the edit prompt but little of its wording; its neighbours (same relation, other subjects) share the
wording and not the name. Character n-grams see names at sub-word level, and IDF weights (fitted on text
where the relation templates are frequent: the statistics corpus, every fact under every template) make
the name carry the similarity while template glue ("The … of … is", "Question:") weighs almost nothing.
Measured on the embedded model's train split (``memfed.bench.evolve_scope``), this separates paraphrases
from neighbours far better than the model's own mean-pooled hidden states, which mostly encode the
template.

Vectors are L2-normalized, so a dot product is the cosine similarity, in [0, 1] (all weights are
non-negative). The hashing is crc32 (stable across processes, unlike Python's ``hash``), so an embedding
stored in a cube is reproduced by any reader with the same spec and IDF table.
"""

from __future__ import annotations

import math
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from memfed.errors import InvalidArgumentError


@dataclass(frozen=True)
class NgramSpec:
    """How text becomes hashed n-gram ids: n-gram lengths ``n_min``…``n_max`` over lower-cased text with
    one space around it, hashed into ``dim`` buckets."""

    dim: int = 8192
    n_min: int = 3
    n_max: int = 5

    def __post_init__(self) -> None:
        if self.dim < 16 or not 1 <= self.n_min <= self.n_max:
            raise InvalidArgumentError(
                f"bad n-gram spec: dim {self.dim}, n {self.n_min}…{self.n_max}",
                hint="use dim >= 16 and 1 <= n_min <= n_max",
            )

    def as_metadata(self) -> dict[str, str]:
        return {"dim": str(self.dim), "n_min": str(self.n_min), "n_max": str(self.n_max)}

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> NgramSpec:
        try:
            return cls(int(meta["dim"]), int(meta["n_min"]), int(meta["n_max"]))
        except (KeyError, ValueError) as exc:
            raise InvalidArgumentError(f"the n-gram spec in the cube is unreadable ({exc})") from None

    def counts(self, text: str) -> Counter[int]:
        """Bucket id → count of the n-grams of ``text``."""
        # Punctuation becomes a word break: "Veltria's" and "Veltria?" must contain the n-grams of
        # "Veltria" with its word boundary, as the name alone does.
        words = "".join(ch if ch.isalnum() else " " for ch in text.lower()).split()
        padded = f" {' '.join(words)} "
        out: Counter[int] = Counter()
        for n in range(self.n_min, self.n_max + 1):
            for i in range(len(padded) - n + 1):
                out[zlib.crc32(padded[i : i + n].encode("utf-8")) % self.dim] += 1
        return out


class NgramEmbedder:
    """TF-IDF over hashed character n-grams (see the module docstring)."""

    def __init__(self, spec: NgramSpec, idf: torch.Tensor) -> None:
        if idf.shape != (spec.dim,):
            raise InvalidArgumentError(
                f"the IDF table has shape {tuple(idf.shape)}, the spec asks for ({spec.dim},)"
            )
        self.spec, self.idf = spec, idf.float()

    @classmethod
    def fit(cls, corpus: Iterable[str], spec: NgramSpec | None = None) -> NgramEmbedder:
        """IDF from ``corpus`` (document frequency per bucket, smoothed: log((1+N)/(1+df)) + 1)."""
        spec = spec or NgramSpec()
        df = torch.zeros(spec.dim)
        n = 0
        for text in corpus:
            ids = list(spec.counts(text))
            if ids:
                df[torch.tensor(ids)] += 1
            n += 1
        if n == 0:
            raise InvalidArgumentError("the IDF corpus is empty", hint="give at least one text")
        return cls(spec, torch.log((1.0 + n) / (1.0 + df)) + 1.0)

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """(len(texts), dim) unit vectors: sublinear term frequency (1 + log tf) times IDF."""
        out = torch.zeros(len(texts), self.spec.dim)
        for row, text in enumerate(texts):
            counts = self.spec.counts(text)
            if not counts:
                continue
            ids = torch.tensor(list(counts))
            tf = torch.tensor([1.0 + math.log(c) for c in counts.values()])
            out[row, ids] = tf * self.idf[ids]
        return torch.nn.functional.normalize(out, dim=-1)


def default_embedder(spec: NgramSpec | None = None) -> NgramEmbedder:
    """The embedder fitted on the editing statistics corpus (every shipped fact under every template)."""
    from memfed.node.editing.stats import default_corpus

    return NgramEmbedder.fit(default_corpus(), spec)
