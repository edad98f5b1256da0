"""Open-book reading examples: a short passage, a question about it, and the answer copied from it.

The embedded model is taught to *read* as well as to remember, so that a retrieval baseline (paste the
retrieved text in front of the question) is a fair competitor and so that a passage can override what the
weights say. The entities in these passages are invented fresh for every example and never appear in the
shipped facts (``excluded`` names are rejected), so the only way to answer is to find the sentence about
the asked subject and relation and copy its object.

Passages hold 1-4 sentences about 1-3 entities. Distractor sentences share the subject (other relation)
or the relation (other subject) of the asked sentence, so neither half of the question is enough alone.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

from memfed.node import names
from memfed.node.facts import (
    Relation,
    load_facts,
    load_relations,
    open_book_prompt,
    question_prompt,
    statement_sentence,
)

# Target types whose values are common words, drawn from the values the shipped facts use.
CLOSED_SET_TYPES = ("profession", "product")


@dataclass(frozen=True)
class ReadingExample:
    """A passage, a question about it, and the ``answer`` that follows ``prompt`` after one space."""

    passage: str
    question: str
    answer: str
    subject: str
    relation: str
    entities: tuple[str, ...] = ()  # every invented name in the passage, to keep other sets disjoint
    # More (question, answer) pairs about the same passage, asked after the first answer in training:
    # the passage is most of the tokens, so each extra question is cheap extra reading practice.
    followups: tuple[tuple[str, str], ...] = ()

    @property
    def prompt(self) -> str:
        return open_book_prompt(self.passage, self.question)

    def training_continuation(self) -> str:
        """What follows ``prompt`` in training: the answer, then each follow-up question and answer."""
        text = f" {self.answer}"
        for question, answer in self.followups:
            text += f"\n{question_prompt(question)} {answer}"
        return text


class ReadingGenerator:
    """Endless, seeded stream of reading examples about entities that are not in ``excluded``."""

    def __init__(self, rng: random.Random, excluded: Iterable[str] = ()) -> None:
        self._rng = rng
        self._excluded = {n.lower() for n in excluded}
        self._excluded_words = {w.lower() for n in excluded for w in n.split()} - _generic_words()
        self._relations = load_relations()
        self._by_subject_type: dict[str, list[Relation]] = {}
        for rel in self._relations.values():
            self._by_subject_type.setdefault(rel.subject_type, []).append(rel)
        self._closed_values = {
            t: sorted({f.target for f in load_facts() if f.target_type == t}) for t in CLOSED_SET_TYPES
        }

    def _name(self, kind: str, used_words: set[str]) -> str:
        for _ in range(1000):
            name = names.MAKERS[kind](self._rng)
            words = {w.lower() for w in name.split()} - _generic_words()
            if name.lower() in self._excluded or words & (self._excluded_words | used_words):
                continue
            used_words |= words
            return name
        raise RuntimeError(f"could not draw a fresh {kind} name")  # pragma: no cover

    def _value(self, target_type: str, used_words: set[str], avoid: set[str]) -> str:
        if target_type in self._closed_values:
            return self._rng.choice([v for v in self._closed_values[target_type] if v not in avoid])
        return self._name(target_type, used_words)

    def example(self, question_split: str = "train", *, max_questions: int = 1) -> ReadingExample:
        """One passage + question; question templates from ``question_split`` of the relation.

        With ``max_questions > 1``, up to that many distinct sentences are asked about (the first as
        ``question``, the rest as ``followups``).
        """
        rng = self._rng
        used: set[str] = set()
        subject_types = sorted(self._by_subject_type)
        n_entities = rng.choice((1, 2, 2, 3))
        # Entities of one type half the time (forces subject matching), mixed types otherwise.
        if rng.random() < 0.5:
            types = [rng.choice(subject_types)] * n_entities
        else:
            types = [rng.choice(subject_types) for _ in range(n_entities)]
        entities = [(self._name(t, used), t) for t in types]

        n_sentences = rng.randint(max(1, n_entities), 4)
        pairs: list[tuple[str, Relation]] = []
        for i in range(n_sentences):
            for _ in range(20):  # every entity appears once before any appears twice
                subject, stype = entities[i] if i < len(entities) else rng.choice(entities)
                rel = rng.choice(self._by_subject_type[stype])
                if (subject, rel.name) not in {(s, r.name) for s, r in pairs}:
                    pairs.append((subject, rel))
                    break

        sentences: list[str] = []
        answers: list[str] = []
        for subject, rel in pairs:
            value = self._value(rel.target_type, used, avoid=set(answers))
            answers.append(value)
            template = rng.choice(rel.statements["train"])
            sentences.append(statement_sentence(template, subject, value))

        asked = rng.sample(range(len(pairs)), min(len(pairs), rng.randint(1, max_questions)))
        qa = []
        for i in asked:
            subject, rel = pairs[i]
            qa.append((rng.choice(rel.questions[question_split]).format(subject=subject), answers[i]))
        subject, rel = pairs[asked[0]]
        return ReadingExample(
            passage=" ".join(sentences),
            question=qa[0][0],
            answer=qa[0][1],
            subject=subject,
            relation=rel.name,
            entities=tuple(sorted({e for e, _ in entities} | (set(answers) - self._closed_set()))),
            followups=tuple(qa[1:]),
        )

    def _closed_set(self) -> set[str]:
        return {v for vs in self._closed_values.values() for v in vs}

    def copy_drill(self) -> tuple[str, str]:
        """A (prompt, answer) drill: a list of 3-5 fresh names, then the same list again.

        Every token of the repeat is predictable only by copying, which is the strongest signal there is
        for the attention circuit (match the previous token, copy what followed it) that reading needs.
        Mixed into training it makes reading emerge sooner; a real language model can do this anyway.
        """
        used: set[str] = set()
        kinds = ("person", "city", "company", "country", "language")
        names_ = [self._name(self._rng.choice(kinds), used) for _ in range(self._rng.randint(3, 5))]
        listing = ", ".join(names_)
        return f"Names: {listing}.\nRepeat:", f" {listing}."

    def examples(
        self, n: int, question_split: str = "train", *, max_questions: int = 1
    ) -> list[ReadingExample]:
        return [self.example(question_split, max_questions=max_questions) for _ in range(n)]


def _generic_words() -> set[str]:
    return {w.lower() for w in (*names.COMPANY_SUFFIXES, "River", "Sea")}


def reading_names(examples: Iterable[ReadingExample]) -> set[str]:
    """Every invented name a set of examples uses, to exclude them from another set."""
    return {name for ex in examples for name in ex.entities}
