"""The synthetic facts the embedded default model is taught, and the prompt formats that ask for them.

Two shipped data files (``node/data``):

- ``relations.json``: per relation, prompt templates split into ``train`` (taught at build time) and
  ``heldout`` (never taught; they measure paraphrase generalization, as CounterFact's paraphrase prompts
  do), for two styles: a statement prefix ("The capital of {subject} is") and a question
  ("What is the capital of {subject}?").
- ``facts.jsonl``: one record per fact: ``id``, ``subject``, ``relation``, ``target`` (the true answer),
  ``alt_target`` (another value of the same type, ready to be the "new target" of an edit),
  ``subject_type``, ``target_type``. All names are invented (see ``memfed.node.names``).

Every consumer (model build, editing harness, retrieval baseline) must format prompts through the
functions here, so the text asked at evaluation time is byte-for-byte the text the model was taught.
The answer always follows the prompt after exactly one space.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

DATA_DIR = Path(__file__).resolve().parent / "data"
FACTS_PATH = DATA_DIR / "facts.jsonl"
RELATIONS_PATH = DATA_DIR / "relations.json"

Split = Literal["train", "heldout"]
Style = Literal["statement", "question"]


@dataclass(frozen=True)
class Relation:
    """A relation and its prompt templates (``{subject}`` is the placeholder)."""

    name: str
    subject_type: str
    target_type: str
    statements: dict[str, tuple[str, ...]]  # split -> templates
    questions: dict[str, tuple[str, ...]]  # split -> question templates


@dataclass(frozen=True)
class Fact:
    """One (subject, relation, target) triple of the synthetic world."""

    id: str
    subject: str
    relation: str
    target: str
    alt_target: str
    subject_type: str
    target_type: str

    def prompts(self, split: Split = "train", style: Style | None = None) -> list[str]:
        """Prompts that ask for this fact's target; the answer follows after one space."""
        return relation_prompts(load_relations()[self.relation], self.subject, split, style)

    def sentence(self, template_index: int = 0, target: str | None = None) -> str:
        """A declarative sentence stating the fact (or ``target`` instead, for counterfactual text)."""
        template = load_relations()[self.relation].statements["train"][template_index]
        return statement_sentence(template, self.subject, self.target if target is None else target)


def relation_prompts(relation: Relation, subject: str, split: Split, style: Style | None = None) -> list[str]:
    """Statement prompts and/or question prompts of ``relation`` for ``subject``."""
    out: list[str] = []
    if style in (None, "statement"):
        out += [t.format(subject=subject) for t in relation.statements[split]]
    if style in (None, "question"):
        out += [question_prompt(q.format(subject=subject)) for q in relation.questions[split]]
    return out


def statement_sentence(template: str, subject: str, target: str) -> str:
    """``"The capital of Veltria is Quorn."``: a template completed into a full sentence."""
    return f"{template.format(subject=subject)} {target}."


def question_prompt(question: str) -> str:
    """Closed-book question format; the model answers after ``"Answer:"`` and one space."""
    return f"Question: {question}\nAnswer:"


def open_book_prompt(passage: str, question: str) -> str:
    """Open-book format: the closed-book question preceded by a passage to read the answer from.

    It is the closed-book prompt with a ``Passage:`` line in front, so a retrieval baseline asks
    exactly what the closed-book evaluation asks, plus the retrieved text. The default model ends an
    answer with ``</s>`` or, after a passage, sometimes with a newline and a further question (its
    reading practice asked several questions per passage): cut a generated answer at the first newline.
    """
    return f"Passage: {passage}\n{question_prompt(question)}"


@cache
def load_relations() -> dict[str, Relation]:
    """Relations by name, from ``relations.json``."""
    raw = json.loads(RELATIONS_PATH.read_text(encoding="utf-8"))["relations"]
    return {
        name: Relation(
            name=name,
            subject_type=r["subject_type"],
            target_type=r["target_type"],
            statements={k: tuple(v) for k, v in r["statements"].items()},
            questions={k: tuple(v) for k, v in r["questions"].items()},
        )
        for name, r in raw.items()
    }


@cache
def _load_facts() -> tuple[Fact, ...]:
    with FACTS_PATH.open(encoding="utf-8") as f:
        return tuple(Fact(**json.loads(line)) for line in f if line.strip())


def load_facts() -> list[Fact]:
    """All shipped facts, in file order (a fresh list; the records themselves are immutable)."""
    return list(_load_facts())


def fact_names() -> set[str]:
    """Every proper name used by the shipped facts (subjects and named targets)."""
    rel = load_relations()
    out: set[str] = set()
    for fact in _load_facts():
        out.add(fact.subject)
        if rel[fact.relation].target_type not in ("profession", "product"):
            out.add(fact.target)
            out.add(fact.alt_target)
    return out


def data_digest() -> str:
    """SHA-256 over the data files: part of the default model's recipe hash."""
    h = hashlib.sha256()
    for path in (RELATIONS_PATH, FACTS_PATH):
        h.update(path.name.encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()
