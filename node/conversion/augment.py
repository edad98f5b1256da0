"""Augmentation: the training items a document becomes, and the held-out questions that check them.

A LoRA trained on a document's sentences alone learns those strings, not the facts: asked in other
words it fails (the "reversal / paraphrase curse" of knowledge injection). So each fact is also written
in every *trained* phrasing the model knows for its relation (rewrites), as a cloze (the statement with
the answer left for the model) and as a question-answer pair. The host model here is too small to write
paraphrases itself, so these come from the relation templates: deterministic, the same on every machine.

Validation asks with the relation's *held-out* phrasings, which no training item uses, so a passing
recall says the module learned the fact, not a string. Formats match the default model's build exactly
(statements scored on every token and ended with a period, questions scored on the answer only).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from memfed.node.conversion.documents import DocFact, Document
from memfed.node.facts import load_relations, question_prompt


@dataclass(frozen=True)
class TrainingItem:
    """One training sequence: ``prompt`` then, when given, one space and ``answer``.

    ``whole``: every token is scored (text the model should be able to produce); otherwise only the
    answer is (a question the model should not learn to ask). ``kind`` says which augmentation made it.
    """

    prompt: str
    answer: str
    whole: bool
    kind: str

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.answer}" if self.answer else self.prompt


@dataclass(frozen=True)
class Probe:
    """A prompt whose greedy continuation should be ``answer``, asked about one fact."""

    prompt: str
    answer: str
    subject: str
    relation: str


def fact_items(fact: DocFact) -> list[TrainingItem]:
    """Rewrites (every trained statement phrasing), clozes and question-answer pairs for one fact."""
    rel = load_relations()[fact.relation]
    items: list[TrainingItem] = []
    for template in rel.statements["train"]:
        prompt = template.format(subject=fact.subject)
        items.append(TrainingItem(prompt, f"{fact.target}.", True, "rewrite"))
        items.append(TrainingItem(prompt, fact.target, False, "cloze"))
    for template in rel.questions["train"]:
        items.append(
            TrainingItem(question_prompt(template.format(subject=fact.subject)), fact.target, False, "qa")
        )
    return items


def sentence_items(sentence: str) -> list[TrainingItem]:
    """The sentence as text, and as a cloze of its last word (for sentences that state no known fact)."""
    items = [TrainingItem(sentence, "", True, "sentence")]
    head, _, last = sentence.rstrip(".!?").rpartition(" ")
    if head and last:
        items.append(TrainingItem(head, last, False, "cloze"))
    return items


def augment(documents: Sequence[Document]) -> list[TrainingItem]:
    """Every training item the documents make, in a stable order, without duplicates."""
    out: dict[tuple[str, bool, str], TrainingItem] = {}
    for doc in documents:
        facts = {f.sentence: f for f in doc.facts()}
        for sentence in doc.sentences():
            fact = facts.get(" ".join(sentence.split()))
            items = [TrainingItem(sentence, "", True, "sentence")] if fact else sentence_items(sentence)
            for item in items:
                out.setdefault(_key(item), item)
        for fact in doc.facts():
            for item in fact_items(fact):
                out.setdefault(_key(item), item)
    return list(out.values())


def _key(item: TrainingItem) -> tuple[str, bool, str]:
    """Items that train the same tokens on the same text are one item (a whole-text item scores all)."""
    return (item.text, item.whole, "" if item.whole else item.answer)


def all_facts(documents: Iterable[Document]) -> list[DocFact]:
    """The documents' facts, one per (subject, relation): the first document that states it wins."""
    seen: dict[tuple[str, str], DocFact] = {}
    for doc in documents:
        for fact in doc.facts():
            seen.setdefault(fact.key, fact)
    return list(seen.values())


def heldout_probes(facts: Sequence[DocFact], items: Sequence[TrainingItem] = ()) -> list[Probe]:
    """Held-out statement and question phrasings of each fact, minus any that training text contains.

    A document may itself use a held-out phrasing; that phrasing is then trained, not held out.
    """
    trained = [item.text for item in items]
    rels = load_relations()
    probes: list[Probe] = []
    for fact in facts:
        rel = rels[fact.relation]
        prompts = [t.format(subject=fact.subject) for t in rel.statements["heldout"]]
        prompts += [question_prompt(q.format(subject=fact.subject)) for q in rel.questions["heldout"]]
        for prompt in prompts:
            if not any(text.startswith(prompt + " ") for text in trained):
                probes.append(Probe(prompt, fact.target, fact.subject, fact.relation))
    return probes


def trained_probes(facts: Sequence[DocFact]) -> list[Probe]:
    """The trained phrasings of each fact (statements and questions): what the module saw."""
    rels = load_relations()
    probes = []
    for fact in facts:
        rel = rels[fact.relation]
        prompts = [t.format(subject=fact.subject) for t in rel.statements["train"]]
        prompts += [question_prompt(q.format(subject=fact.subject)) for q in rel.questions["train"]]
        probes += [Probe(p, fact.target, fact.subject, fact.relation) for p in prompts]
    return probes
