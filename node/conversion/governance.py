"""Governance: new plaintext that contradicts what an active module answers is flagged for a person.

A module keeps answering what it was taught after the world changed; the new text says otherwise. For
each fact an active plaintext document states, each module is asked the fact's question (every trained
phrasing, majority answer). A *conflict* is a module answer that differs from the text's answer *and*
from the bare model's answer (so the module really holds a claim about it, rather than just not knowing).

Each conflict is written down as a review document (``conflict/<cube ref>/<doc id>``, status
``pending_review``, tagged ``conflict``) that puts the module's claim, externalized as a sentence, next
to the new text; the new text itself is moved to ``pending_review`` too, so it no longer feeds
retrieval until someone decides which side is right (then: re-internalize, or keep it as text).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from memfed.node.conversion.documents import extract_facts
from memfed.node.conversion.externalize import TAG as EXTERNALIZED_TAG
from memfed.node.conversion.externalize import Claim, ask
from memfed.node.conversion.probing import module_loaded
from memfed.node.facts import load_relations, statement_sentence

if TYPE_CHECKING:
    import torch

    from memfed.cube.core import MemCube
    from memfed.node.plaintext import PlaintextMemory
    from memfed.node.runtime import ModuleRuntime

TAG = "conflict"
DOC_PREFIX = "conflict/"


@dataclass(frozen=True)
class Conflict:
    doc_id: str
    cube_ref: str
    subject: str
    relation: str
    text_says: str
    module_says: str
    base_says: str
    votes: int
    asked: int

    def sentences(self) -> tuple[str, str]:
        """(the module's claim, the text's statement) as sentences in one phrasing."""
        template = load_relations()[self.relation].statements["train"][0]
        return (
            statement_sentence(template, self.subject, self.module_says),
            statement_sentence(template, self.subject, self.text_says),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def find_conflicts(
    model: torch.nn.Module,
    tokenizer: Any,
    cubes: Sequence[MemCube],
    vault: PlaintextMemory,
    *,
    doc_ids: Sequence[str] | None = None,
    runtime: ModuleRuntime | None = None,
) -> list[Conflict]:
    """Conflicts between ``cubes`` and the active documents (or ``doc_ids``) of ``vault``.

    Review documents (externalized or conflict notes) are not checked: they are claims, not new text.
    """
    if doc_ids is not None:
        docs = [vault.get(d, count_access=False) for d in doc_ids]
    else:
        docs = vault.list("active")
    facts = [
        (doc.doc_id, fact)
        for doc in docs
        if not {EXTERNALIZED_TAG, TAG} & set(doc.tags)
        for fact in extract_facts(doc.text)
    ]
    if not facts:
        return []
    keys = list(dict.fromkeys(f.key for _, f in facts))
    out: list[Conflict] = []
    for cube in cubes:
        with module_loaded(model, cube, runtime) as (rt, ref):
            claims: dict[tuple[str, str], Claim] = {
                (c.subject, c.relation): c for c in ask(rt, tokenizer, keys, ref)
            }
        for doc_id, fact in facts:
            c = claims[fact.key]
            if c.consistent and c.answer != fact.target and c.answer != c.base_answer:
                out.append(
                    Conflict(
                        doc_id,
                        ref,
                        fact.subject,
                        fact.relation,
                        fact.target,
                        c.answer,
                        c.base_answer,
                        c.votes,
                        c.asked,
                    )
                )
    return out


def record_conflicts(vault: PlaintextMemory, conflicts: Sequence[Conflict]) -> list[str]:
    """Write one review document per (module, document) pair and mark the new text for review.

    Returns the review documents' ids. Recording the same conflicts again replaces their text.
    """
    groups: dict[tuple[str, str], list[Conflict]] = {}
    for c in conflicts:
        groups.setdefault((c.cube_ref, c.doc_id), []).append(c)
    written = []
    for (ref, doc_id), items in groups.items():
        source = vault.get(doc_id, count_access=False)
        lines = [f"Module {ref} and document {doc_id} disagree. Review which is right."]
        for c in items:
            claim, statement = c.sentences()
            lines.append(f"Module {ref} answers: {claim}")
            lines.append(f"Document {doc_id} says: {statement}")
        lines += ["", f"The new text ({doc_id}, version {source.version}):", source.text]
        review_id = f"{DOC_PREFIX}{ref}/{doc_id}"
        vault.add(
            review_id,
            "\n".join(lines),
            title=f"Conflict: module {ref} vs {doc_id}",
            tags=(TAG, f"cube:{ref}", f"doc:{doc_id}"),
            source="governance",
            status="pending_review",
        )
        if source.status == "active":
            vault.set_status(doc_id, "pending_review")
        written.append(review_id)
    return written


def list_conflicts(vault: PlaintextMemory, *, status: str | None = "pending_review") -> list[dict[str, Any]]:
    """The recorded conflict notes (by default the ones still awaiting review)."""
    out = []
    for doc in vault.list(status):
        if TAG not in doc.tags:
            continue
        tags = dict(t.split(":", 1) for t in doc.tags if ":" in t)
        out.append(
            {
                "review_doc_id": doc.doc_id,
                "cube_ref": tags.get("cube", ""),
                "doc_id": tags.get("doc", ""),
                "status": doc.status,
                "title": doc.title,
                "text": doc.text,
            }
        )
    return out
