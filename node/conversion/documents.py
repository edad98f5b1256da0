"""Documents to internalize, and the facts a deterministic reader finds in them.

A document is a title and prose (Markdown: a ``# Title`` line, then paragraphs; plain text works too).
The embedded host model is far too small to paraphrase or question a text itself, so the conversion path
reads documents with the relation templates the model was built with (``node/data/relations.json``):
a sentence that is a template completed with a subject and a target ("Brigis's capital is Dridaekirn.")
is a *fact*; any other sentence is kept as plain text. Facts are what augmentation rewrites, what
validation asks about with held-out phrasings, and what externalization must recover.

The documents shipped in ``node/data/documents`` are ours: invented entities (none of them in the
model's fact file) stated in the same relation vocabulary, so the model's held-out templates apply.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from memfed.errors import InvalidArgumentError, NotFoundError
from memfed.node.facts import DATA_DIR, load_relations

DOCUMENTS_DIR = DATA_DIR / "documents"
MAX_DOCUMENT_CHARS = 1_000_000

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# A name: capitalised words ("Brigis", "Keiskeis Foundry", "Grese River"); a target: anything up to the
# sentence's final period (closed-set values are lower case: "a chemist", "glass lenses").
_NAME = r"[A-Z][\w'-]*(?: [A-Z][\w'-]*)*"
_TARGET = r"[^.!?]+?"


@dataclass(frozen=True)
class DocFact:
    """A (subject, relation, target) triple stated by one sentence of a document."""

    subject: str
    relation: str
    target: str
    sentence: str = ""

    @property
    def key(self) -> tuple[str, str]:
        """What the fact is about: the (subject, relation) a probe asks for."""
        return (self.subject, self.relation)

    @property
    def triple(self) -> tuple[str, str, str]:
        return (self.subject, self.relation, self.target)


@dataclass(frozen=True)
class Document:
    """A text to internalize: an id (the plaintext memory's ``doc_id``), a title and the text."""

    doc_id: str
    title: str
    text: str

    @property
    def digest(self) -> str:
        """``sha256:<hex>`` of the text: what a cube's origin links, so a changed source is detectable."""
        return "sha256:" + hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def sentences(self) -> list[str]:
        return split_sentences(self.text)

    def facts(self) -> list[DocFact]:
        return extract_facts(self.text)


def split_sentences(text: str) -> list[str]:
    """Sentences of prose: paragraphs' lines are joined, headings dropped, split after ``.!?``."""
    out: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text):
        lines = [
            ln.strip() for ln in paragraph.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
        ]
        joined = " ".join(lines)
        out += [s.strip() for s in _SENTENCE_END.split(joined) if s.strip()]
    return out


@cache
def _patterns() -> tuple[tuple[int, str, re.Pattern[str]], ...]:
    """(literal length, relation, regex) for every statement template, longest literal first.

    Longest first: "X was born in the city of Y." must read as the fourth birthplace template with target
    Y, not as the first one with target "the city of Y".
    """
    out = []
    for rel in load_relations().values():
        for split in ("train", "heldout"):
            for template in rel.statements[split]:
                head, _, tail = template.partition("{subject}")
                regex = f"^{re.escape(head)}(?P<subject>{_NAME}){re.escape(tail)} (?P<target>{_TARGET})\\.$"
                out.append((len(head) + len(tail), rel.name, re.compile(regex)))
    out.sort(key=lambda p: -p[0])
    return tuple(out)


def parse_fact(sentence: str) -> DocFact | None:
    """The fact a sentence states in one of the relation templates, or None."""
    sentence = " ".join(sentence.split())
    for _, relation, pattern in _patterns():
        m = pattern.match(sentence)
        if m:
            return DocFact(m["subject"], relation, m["target"].strip(), sentence)
    return None


def extract_facts(text: str) -> list[DocFact]:
    """Every fact the text states, in order, one per (subject, relation): the first statement wins."""
    seen: dict[tuple[str, str], DocFact] = {}
    for sentence in split_sentences(text):
        fact = parse_fact(sentence)
        if fact is not None:
            seen.setdefault(fact.key, fact)
    return list(seen.values())


def parse_document(text: str, *, doc_id: str, title: str = "") -> Document:
    """A Document from Markdown or plain text; the title is the first ``# `` heading unless given."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidArgumentError(f"document {doc_id!r} is empty", hint="there is nothing to internalize")
    if len(text) > MAX_DOCUMENT_CHARS:
        raise InvalidArgumentError(
            f"document {doc_id!r} has {len(text):,} characters; the limit is {MAX_DOCUMENT_CHARS:,}",
            hint="split it into several documents",
        )
    if not title:
        for line in text.splitlines():
            if line.startswith("# "):
                title = line[2:].strip()
                break
    return Document(doc_id=doc_id, title=title or doc_id, text=text)


def read_document(path: str | Path, *, doc_id: str | None = None) -> Document:
    """A document file (UTF-8 Markdown or text); its id defaults to ``doc/<file stem>``."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"document {str(path)!r} does not exist", hint="pass a Markdown or text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgumentError(f"document {path} is not UTF-8 text: {exc}") from exc
    return parse_document(text, doc_id=doc_id or f"doc/{path.stem}")


def shipped_documents() -> list[Document]:
    """The documents that ship with memfed (``node/data/documents/*.md``), in file-name order."""
    return [read_document(p) for p in sorted(DOCUMENTS_DIR.glob("*.md"))]
