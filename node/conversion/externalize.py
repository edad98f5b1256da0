"""Externalize (parameter → plaintext), the MemDumper: write down what a module changes, for review.

The weights of a LoRA do not say what it knows; its *behaviour* does. So the module is probed: the same
prompts are answered by the bare model and with the module, and every question whose answer the module
changes becomes a claim, written as a plain sentence. Probes come from the cube's origin when it has one
(an internalized cube lists the (subject, relation) pairs it was taught, never the answers), otherwise
from generic probes: each relation's phrasing opened without a subject ("The capital of") to let the
module say what it would complete, plus known subjects (from the plaintext vault and the model's own
world) asked about every relation that fits them.

Each (subject, relation) is asked in every trained phrasing; the module's answer is the majority, and the
claim is kept when that answer differs from the bare model's and the module gave it in most phrasings
(an answer given once is an accident of one phrasing; it is reported as uncertain, not written). The
claims are stored as one plaintext document with status ``pending_review``: a person decides whether the
text is right before anything retrains from it or retrieves it.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from memfed.cube.manifest import ref_string
from memfed.node.conversion.documents import DocFact, parse_fact
from memfed.node.conversion.internalize import probe_keys
from memfed.node.conversion.probing import clean_answer, generate, module_loaded
from memfed.node.facts import load_facts, load_relations, question_prompt, statement_sentence

if TYPE_CHECKING:
    import torch

    from memfed.cube.core import MemCube
    from memfed.node.plaintext import PlaintextMemory
    from memfed.node.runtime import ModuleRuntime

DOC_PREFIX = "externalized/"
TAG = "externalized"
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Claim:
    """What the module answers about one (subject, relation), against the bare model's answer."""

    subject: str
    relation: str
    answer: str
    base_answer: str
    votes: int  # phrasings that gave ``answer`` with the module
    asked: int  # phrasings asked

    @property
    def triple(self) -> tuple[str, str, str]:
        return (self.subject, self.relation, self.answer)

    @property
    def consistent(self) -> bool:
        """The module gave this answer in most phrasings: knowledge, not a one-phrasing accident."""
        return 2 * self.votes > self.asked

    @property
    def sentence(self) -> str:
        template = load_relations()[self.relation].statements["train"][0]
        return statement_sentence(template, self.subject, self.answer)


@dataclass
class ExternalizeReport:
    cube_ref: str
    probe_source: str  # "origin" or "generic"
    keys_probed: int
    prompts: int
    claims: list[Claim]
    uncertain: list[Claim]  # changed answers the module did not give in most phrasings (not written)
    doc_id: str  # the pending_review document written, "" without a vault
    text: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("claims", "uncertain"):
            out[key] = [{**asdict(c), "sentence": c.sentence} for c in getattr(self, key)]
        return out


def key_prompts(subject: str, relation: str) -> list[str]:
    """Every trained phrasing that asks for (subject, relation): statements, then questions."""
    rel = load_relations()[relation]
    prompts = [t.format(subject=subject) for t in rel.statements["train"]]
    return prompts + [question_prompt(q.format(subject=subject)) for q in rel.questions["train"]]


def ask(
    runtime: ModuleRuntime,
    tokenizer: Any,
    keys: Sequence[tuple[str, str]],
    module: str,
    *,
    progress: Progress | None = None,
) -> list[Claim]:
    """Ask every key in every trained phrasing, bare and with ``module``; one Claim per key (kept or
    not: the caller filters on ``answer != base_answer``)."""
    prompts: list[str] = []
    spans: list[tuple[int, int]] = []
    for subject, relation in keys:
        start = len(prompts)
        prompts += key_prompts(subject, relation)
        spans.append((start, len(prompts)))
    if progress is not None:
        progress(0, 2)
    bare = [clean_answer(t) for t in generate(runtime, tokenizer, prompts)]
    if progress is not None:
        progress(1, 2)
    moduled = [clean_answer(t) for t in generate(runtime, tokenizer, prompts, [module])]
    if progress is not None:
        progress(2, 2)
    claims = []
    for (subject, relation), (a, b) in zip(keys, spans, strict=True):
        answer, votes = _majority(moduled[a:b])
        base, _ = _majority(bare[a:b])
        claims.append(Claim(subject, relation, answer, base, votes, b - a))
    return claims


def _majority(answers: Iterable[str]) -> tuple[str, int]:
    counts = Counter(a for a in answers if a)
    if not counts:
        return "", 0
    answer, votes = counts.most_common(1)[0]
    return answer, votes


def generic_keys(
    runtime: ModuleRuntime,
    tokenizer: Any,
    module: str,
    *,
    subjects: Iterable[tuple[str, str]] = (),
) -> list[tuple[str, str]]:
    """Candidate (subject, relation) keys for a cube whose origin names none.

    1. Open phrasings: each statement template that starts before its subject ("The capital of") is
       continued by the module and by the bare model; a completed sentence that states a different fact
       under the module names a key.
    2. Known subjects (``subjects``: (name, subject type) pairs, plus the model's world) are asked in
       one question phrasing per fitting relation; a changed answer names a key.
    """
    rels = load_relations()
    keys: dict[tuple[str, str], None] = {}
    stems = [
        (name, t.split("{subject}")[0])
        for name, rel in rels.items()
        for t in rel.statements["train"]
        if not t.startswith("{subject}")
    ]
    prompts = [stem.rstrip() for _, stem in stems]
    with_module = generate(runtime, tokenizer, prompts, [module], max_new_tokens=16)
    bare = generate(runtime, tokenizer, prompts, max_new_tokens=16)
    for (relation, _), prompt, a, b in zip(stems, prompts, with_module, bare, strict=True):
        fact = _sentence_fact(prompt + a)
        if fact is not None and fact.relation == relation and fact != _sentence_fact(prompt + b):
            keys.setdefault(fact.key, None)

    typed = dict.fromkeys((f.subject, f.subject_type) for f in load_facts())
    typed.update(dict.fromkeys(subjects))
    asks = [
        (subject, name)
        for subject, stype in typed
        for name, rel in rels.items()
        if rel.subject_type == stype and (subject, name) not in keys
    ]
    prompts = [question_prompt(rels[r].questions["train"][0].format(subject=s)) for s, r in asks]
    with_module = [clean_answer(t) for t in generate(runtime, tokenizer, prompts, [module])]
    bare = [clean_answer(t) for t in generate(runtime, tokenizer, prompts)]
    for key, a, b in zip(asks, with_module, bare, strict=True):
        if a and a != b:
            keys.setdefault(key, None)
    return list(keys)


def _sentence_fact(text: str) -> DocFact | None:
    head = text.split("\n", 1)[0]
    cut = head.find(".")
    return parse_fact(head[: cut + 1]) if cut > 0 else None


def vault_subjects(vault: PlaintextMemory | None) -> list[tuple[str, str]]:
    """(subject, subject type) of every fact any vault document states, whatever its status."""
    if vault is None:
        return []
    from memfed.node.conversion.documents import extract_facts

    rels = load_relations()
    out: dict[tuple[str, str], None] = {}
    for doc in vault.list():
        for fact in extract_facts(doc.text):
            out.setdefault((fact.subject, rels[fact.relation].subject_type), None)
    return list(out)


def externalize(
    model: torch.nn.Module,
    tokenizer: Any,
    cube: MemCube,
    *,
    vault: PlaintextMemory | None = None,
    runtime: ModuleRuntime | None = None,
    generic: bool = False,
    progress: Progress | None = None,
) -> ExternalizeReport:
    """Probe ``cube`` on ``model`` and write what it changes as a ``pending_review`` vault document.

    ``generic`` ignores the origin's probe list (to measure the generic probes on an internalized cube).
    The document id is ``externalized/<cube_id>@<version>``; externalizing again replaces its text
    (a new version in the vault) and puts it back to ``pending_review``.
    """
    t0 = time.perf_counter()
    ref = ref_string(cube.manifest)
    keys = [] if generic else probe_keys(cube.manifest.origin)
    source = "origin" if keys else "generic"
    with module_loaded(model, cube, runtime) as (rt, loaded):
        if not keys:
            keys = generic_keys(rt, tokenizer, loaded, subjects=vault_subjects(vault))
        asked = ask(rt, tokenizer, keys, loaded, progress=progress)
    changed = [c for c in asked if c.answer and c.answer != c.base_answer]
    claims = [c for c in changed if c.consistent]
    uncertain = [c for c in changed if not c.consistent]
    text = "\n".join(c.sentence for c in claims)
    doc_id = ""
    if vault is not None and claims:
        doc_id = f"{DOC_PREFIX}{ref}"
        vault.add(
            doc_id,
            text,
            title=f"What module {ref} answers (externalized; review before use)",
            tags=(TAG, f"cube:{ref}"),
            source=f"cube:{ref}",
            status="pending_review",
        )
    return ExternalizeReport(
        cube_ref=ref,
        probe_source=source,
        keys_probed=len(keys),
        prompts=sum(c.asked for c in asked),
        claims=claims,
        uncertain=uncertain,
        doc_id=doc_id,
        text=text,
        seconds=round(time.perf_counter() - t0, 3),
    )


def recovery(expected: Iterable[tuple[str, str, str]], claims: Iterable[Claim]) -> float:
    """Fraction of ``expected`` (subject, relation, target) triples that some claim states exactly."""
    want = set(expected)
    got = {c.triple for c in claims}
    return round(len(want & got) / len(want), 4) if want else 0.0
