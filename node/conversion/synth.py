"""Synthetic documents of a chosen length, for benches (the shipped documents are ~90 tokens each).

Same recipe as the shipped ones: fresh invented entities (none the model knows, none in the shipped
documents), each stated with every relation of its type in a randomly chosen trained phrasing, with a
neutral sentence now and then, until the text reaches the token count asked for. Seeded: the same
arguments give the same document everywhere.
"""

from __future__ import annotations

import random
from typing import Any

from memfed.node import names
from memfed.node.conversion.documents import Document, parse_document, shipped_documents
from memfed.node.fact_synth import PRODUCTS, PROFESSIONS
from memfed.node.facts import fact_names, load_relations, statement_sentence

_SUBJECT_TYPES = ("country", "person", "company", "river")
_FILLER = (
    "The records were checked last year.",
    "Little else is known about it.",
    "Travellers often mention this.",
    "The archive keeps older notes.",
)


def synthetic_document(n_tokens: int, tokenizer: Any, *, seed: int = 0, doc_id: str = "") -> Document:
    """A document of at least ``n_tokens`` tokens (by ``tokenizer``) of new facts about new entities."""
    rng = random.Random(seed)
    taken = set(fact_names())
    for doc in shipped_documents():
        for fact in doc.facts():
            taken |= {fact.subject, fact.target}
    pool = names.NamePool(rng, taken=taken)
    by_type: dict[str, list[Any]] = {}
    for rel in load_relations().values():
        by_type.setdefault(rel.subject_type, []).append(rel)
    paragraphs: list[str] = []
    tokens = 0
    i = 0
    while tokens < n_tokens:
        kind = _SUBJECT_TYPES[i % len(_SUBJECT_TYPES)]
        i += 1
        subject = pool.fresh(kind)
        sentences = []
        for rel in by_type[kind]:
            value = _value(rel.target_type, pool, rng)
            sentences.append(statement_sentence(rng.choice(rel.statements["train"]), subject, value))
        if rng.random() < 0.5:
            sentences.append(rng.choice(_FILLER))
        paragraph = " ".join(sentences)
        paragraphs.append(paragraph)
        tokens += len(tokenizer(paragraph, add_special_tokens=False)["input_ids"])
    title = f"Synthetic gazetteer ({n_tokens} tokens, seed {seed})"
    text = f"# {title}\n\n" + "\n\n".join(paragraphs) + "\n"
    return parse_document(text, doc_id=doc_id or f"synthetic/{n_tokens}-{seed}", title=title)


def _value(target_type: str, pool: names.NamePool, rng: random.Random) -> str:
    if target_type == "profession":
        return rng.choice(PROFESSIONS)
    if target_type == "product":
        return rng.choice(PRODUCTS)
    return pool.fresh(target_type)
