"""A module's own validation set: the facts it was made to hold, asked in held-out phrasings.

An evolved version must not forget what the module was for, so every candidate is measured on these
probes next to the current version (the 1-point gate). Where they come from, first found wins:

1. an explicit set stored in the feedback log (``FeedbackLog.set_validation``): for modules whose facts
   are not in the node's plaintext memory, or when an operator wants a specific set;
2. the cube's origin: an internalized module lists the (subject, relation) pairs it was taught
   (``probe_keys``) and its source documents by vault version and digest; the documents are read back
   from the node's plaintext memory and probed exactly as internalization validated them
   (``heldout_probes``). Evolved versions carry their parent's origin params and sources forward, so
   the set stays the same along the version chain.

The validation facts also serve the poison guard: feedback whose prompt asks for a validation fact
(recognized by the relation templates, ``fact_of_prompt``) and contradicts its answer is dropped. And
they are rehearsed while a candidate trains (``rehearsal``), so learning from feedback does not wear
away what the module was made for.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

from memfed.errors import NotFoundError
from memfed.node.conversion.augment import Probe, TrainingItem, all_facts, augment, fact_items, heldout_probes
from memfed.node.conversion.documents import DocFact, Document
from memfed.node.conversion.internalize import parse_source_ref, probe_keys
from memfed.node.evolve.feedback import normalize_answer
from memfed.node.facts import load_relations, question_prompt

if TYPE_CHECKING:
    from memfed.cube.core import MemCube
    from memfed.node.evolve.feedback import FeedbackLog
    from memfed.node.plaintext import PlaintextMemory

Key = tuple[str, str]  # (subject, relation)


@dataclass(frozen=True)
class ValidationSet:
    """The probes and where they came from ("feedback log", "origin", or "" when none was found)."""

    probes: tuple[Probe, ...]
    source: str

    def answers(self) -> dict[Key, str]:
        """The expected answer per (subject, relation), normalized as feedback answers are."""
        return {(p.subject, p.relation): normalize_answer(p.answer) for p in self.probes if p.subject}

    def rehearsal(self, exclude: set[Key]) -> list[TrainingItem]:
        """The validation facts as internalization teaches them (every *trained* phrasing as statement,
        cloze and question; never the held-out probes themselves), minus the facts in ``exclude``:
        what the module was made to hold, rehearsed while it learns from feedback."""
        answers = self.answers()
        return [
            item
            for (subject, relation), answer in answers.items()
            if (subject, relation) not in exclude and relation in load_relations()
            for item in fact_items(DocFact(subject, relation, answer))
        ]


def validation_set(cube: MemCube, log: FeedbackLog, vault: PlaintextMemory | None) -> ValidationSet:
    """The validation set of ``cube`` (see the module docstring); empty when none can be found."""
    stored = log.validation(cube.manifest.cube_id)
    if stored:
        return ValidationSet(tuple(stored), "feedback log")
    keys = set(probe_keys(cube.manifest.origin))
    if not keys or vault is None:
        return ValidationSet((), "")
    documents = _source_documents(cube, vault)
    facts = [f for f in all_facts(documents) if f.key in keys]
    return ValidationSet(tuple(heldout_probes(facts, augment(documents))), "origin")


def _source_documents(cube: MemCube, vault: PlaintextMemory) -> list[Document]:
    """The origin's plaintext sources, each at the vault version whose digest the origin recorded."""
    documents = []
    for source in cube.manifest.origin.sources:
        parsed = parse_source_ref(source)
        if parsed is None:
            continue
        doc_id, digest = parsed
        try:
            versions = vault.versions(doc_id)
        except NotFoundError:
            continue  # deleted from the vault: its facts cannot be checked, the others still can
        for v in reversed(versions):
            doc = Document(doc_id, v.title, v.text)
            if doc.digest == digest:
                documents.append(doc)
                break
    return documents


@cache
def _prompt_patterns() -> tuple[tuple[re.Pattern[str], str], ...]:
    """(regex, relation) for every statement and question template of every relation, both splits."""
    out = []
    for rel in load_relations().values():
        for split in ("train", "heldout"):
            templates = [*rel.statements[split], *(question_prompt(q) for q in rel.questions[split])]
            for template in templates:
                head, _, tail = template.partition("{subject}")
                pattern = re.compile(f"^{re.escape(head)}(?P<subject>.+?){re.escape(tail)}$", re.DOTALL)
                out.append((pattern, rel.name))
    # Longest literal first, so a specific template wins over one that is its prefix.
    out.sort(key=lambda p: -len(p[0].pattern))
    return tuple(out)


def fact_of_prompt(prompt: str) -> Key | None:
    """The (subject, relation) a prompt asks for when it is one of the relation templates, else None."""
    text = prompt.strip()
    for pattern, relation in _prompt_patterns():
        m = pattern.match(text)
        if m:
            return (m["subject"], relation)
    return None


def facts_asked(prompts: Sequence[str]) -> set[Key]:
    """Every (subject, relation) that one of ``prompts`` asks for."""
    return {key for key in map(fact_of_prompt, prompts) if key is not None}
