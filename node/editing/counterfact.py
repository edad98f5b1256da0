"""Edit cases in the CounterFact format (Meng et al., 2022): read any such file, and write ours.

A case asks to rewrite one fact and says how to check the rewrite::

    {"case_id": 7,
     "requested_rewrite": {"prompt": "The capital of {} is", "subject": "Veltria", "relation_id": "capital",
                           "target_new": {"str": "Quorn"}, "target_true": {"str": "Dralmouth"}},
     "paraphrase_prompts": ["In Veltria, the capital is", ...],        # generalization
     "neighborhood_prompts": [{"prompt": "The capital of Sotramar is", "target": "Waeskesvale"}, ...],
     "generation_prompts": ["Veltria is", ...]}                        # fluency

Neighbourhood prompts may be plain strings, as in the original CounterFact file, where every neighbour's
answer is ``target_true``; ours name each neighbour's own answer (other subjects of the same relation,
the ones sharing the true answer first, as CounterFact picks them). Our file also carries
``subject_prompts``: the edited subject's *other* facts, which an edit must leave alone too.

The shipped file (``node/data/counterfact.jsonl``) has one case per fact the embedded model was taught
(400): the rewrite prompt is a trained template, paraphrases are the held-out templates it never saw, and
the new target is another answer of the same relation (CounterFact's rule: a plausible object, one the
model already produces for other subjects), preferring the fact's ``alt_target``.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memfed.errors import InvalidArgumentError, NotFoundError
from memfed.node import facts as facts_mod
from memfed.node.editing.value import EditRequest

COUNTERFACT_PATH = facts_mod.DATA_DIR / "counterfact.jsonl"
NEIGHBOURS = 6
SEED = 6


@dataclass(frozen=True)
class Probe:
    """A prompt and the answer expected after it (a neighbour's, or the subject's other fact)."""

    prompt: str
    target: str


@dataclass(frozen=True)
class EditCase:
    """One CounterFact case."""

    case_id: str
    prompt: str  # the rewrite prompt with the subject filled in
    subject: str
    target_new: str
    target_true: str | None  # None: unknown (filled in from the model's own answer when evaluated)
    relation: str = ""
    paraphrases: tuple[str, ...] = ()
    neighbours: tuple[Probe, ...] = ()
    subject_probes: tuple[Probe, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def request(self) -> EditRequest:
        return EditRequest(self.prompt, self.subject, self.target_new, self.target_true, self.case_id)


def _target(value: Any, what: str, where: str) -> str:
    if isinstance(value, dict):
        value = value.get("str")
    if not isinstance(value, str) or not value.strip():
        raise InvalidArgumentError(f"{where}: {what} must be a non-empty string or {{'str': ...}}")
    return value.strip()


def _probes(raw: Any, default: str | None, where: str, what: str) -> tuple[Probe, ...]:
    out = []
    for item in raw or ():
        if isinstance(item, str):
            if default is None:
                raise InvalidArgumentError(
                    f"{where}: {what} {item!r} names no answer and the case has no target_true"
                )
            out.append(Probe(item, default))
        elif isinstance(item, dict) and isinstance(item.get("prompt"), str):
            out.append(Probe(item["prompt"], _target(item.get("target"), f"{what} target", where)))
        else:
            raise InvalidArgumentError(f"{where}: each of {what} must be a string or {{'prompt', 'target'}}")
    return tuple(out)


def parse_case(record: dict[str, Any], where: str = "case") -> EditCase:
    """One case from its JSON record; malformed records raise InvalidArgumentError saying what is wrong."""
    if not isinstance(record, dict) or not isinstance(record.get("requested_rewrite"), dict):
        raise InvalidArgumentError(f"{where}: not a CounterFact case (no 'requested_rewrite' object)")
    rw = record["requested_rewrite"]
    template, subject = rw.get("prompt"), rw.get("subject")
    if not isinstance(template, str) or not isinstance(subject, str) or not subject.strip():
        raise InvalidArgumentError(f"{where}: requested_rewrite needs a 'prompt' and a 'subject'")
    prompt = template.format(subject) if "{}" in template else template
    if subject not in prompt:
        raise InvalidArgumentError(
            f"{where}: the prompt {prompt!r} does not contain the subject {subject!r}",
            hint="write the prompt with '{}' where the subject goes, as CounterFact does",
        )
    true = rw.get("target_true")
    target_true = _target(true, "target_true", where) if true not in (None, "", {}) else None
    target_new = _target(rw.get("target_new"), "target_new", where)
    if target_true is not None and target_new == target_true:
        raise InvalidArgumentError(f"{where}: target_new equals target_true ({target_new!r})")
    paraphrases = record.get("paraphrase_prompts") or []
    if not all(isinstance(p, str) for p in paraphrases):
        raise InvalidArgumentError(f"{where}: paraphrase_prompts must be strings")
    return EditCase(
        case_id=str(record.get("case_id", where)),
        prompt=prompt,
        subject=subject,
        target_new=target_new,
        target_true=target_true,
        relation=str(rw.get("relation_id", "")),
        paraphrases=tuple(paraphrases),
        neighbours=_probes(record.get("neighborhood_prompts"), target_true, where, "neighborhood_prompts"),
        subject_probes=_probes(record.get("subject_prompts"), None, where, "subject_prompts"),
        generation_prompts=tuple(p for p in record.get("generation_prompts") or [] if isinstance(p, str)),
        extra={k: v for k, v in record.items() if k not in _KNOWN},
    )


_KNOWN = {
    "case_id", "requested_rewrite", "paraphrase_prompts", "neighborhood_prompts", "subject_prompts",
    "generation_prompts",
}  # fmt: skip


def load_cases(path: str | Path | None = None, *, limit: int | None = None) -> list[EditCase]:
    """Cases from a CounterFact-format file: JSON Lines, or one JSON array (the original's layout).

    Default: the shipped file for the embedded model.
    """
    p = Path(path) if path is not None else COUNTERFACT_PATH
    if not p.is_file():
        raise NotFoundError(f"no case file at {p}", hint="pass a CounterFact-format .json or .jsonl file")
    text = p.read_text(encoding="utf-8")
    try:
        stripped = text.lstrip()
        if stripped.startswith("["):
            records = json.loads(stripped)
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise InvalidArgumentError(f"{p}: not JSON or JSON Lines ({exc})") from exc
    if not records:
        raise InvalidArgumentError(f"{p} holds no cases")
    cases = [parse_case(r, f"{p.name} case {i}") for i, r in enumerate(records[:limit] if limit else records)]
    return cases


TEST_FRACTION = 0.3


def split_cases(
    cases: Sequence[EditCase], *, test_fraction: float = TEST_FRACTION
) -> tuple[list[EditCase], list[EditCase]]:
    """(train, test) split of ``cases`` by *subject*: every case of a subject lands on the same side, so a
    learned editor is evaluated on subjects it never saw edited (not merely on other facts of known ones).

    The side is a hash of the subject name (stable across runs, Python versions and file order), so adding
    cases never moves an existing one to the other side.
    """
    if not 0.0 < test_fraction < 1.0:
        raise InvalidArgumentError(f"test_fraction must be in (0, 1), got {test_fraction}")
    train: list[EditCase] = []
    test: list[EditCase] = []
    for case in cases:
        h = int.from_bytes(hashlib.sha256(case.subject.encode("utf-8")).digest()[:8], "big")
        (test if h / 2**64 < test_fraction else train).append(case)
    return train, test


def case_record(case: EditCase) -> dict[str, Any]:
    """The JSON record of ``case`` (inverse of ``parse_case``)."""
    template = case.prompt.replace(case.subject, "{}")
    rw: dict[str, Any] = {
        "prompt": template,
        "subject": case.subject,
        "relation_id": case.relation,
        "target_new": {"str": case.target_new},
    }
    if case.target_true is not None:
        rw["target_true"] = {"str": case.target_true}
    return {
        "case_id": case.case_id,
        **case.extra,
        "requested_rewrite": rw,
        "paraphrase_prompts": list(case.paraphrases),
        "neighborhood_prompts": [{"prompt": n.prompt, "target": n.target} for n in case.neighbours],
        "subject_prompts": [{"prompt": n.prompt, "target": n.target} for n in case.subject_probes],
        "generation_prompts": list(case.generation_prompts),
    }


def write_cases(cases: Iterable[EditCase], path: str | Path) -> int:
    lines = [json.dumps(case_record(c), ensure_ascii=False) for c in cases]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)


def _new_target(fact: facts_mod.Fact, answers: Sequence[str], rng: random.Random) -> str:
    if fact.alt_target in answers and fact.alt_target != fact.target:
        return fact.alt_target
    return rng.choice(sorted(a for a in set(answers) if a != fact.target))


def shipped_cases(seed: int = SEED) -> list[EditCase]:
    """The cases of the shipped file, generated from the fact data (see the module docstring)."""
    rng = random.Random(seed)
    rels = facts_mod.load_relations()
    all_facts = facts_mod.load_facts()
    by_relation: dict[str, list[facts_mod.Fact]] = defaultdict(list)
    by_subject: dict[str, list[facts_mod.Fact]] = defaultdict(list)
    for f in all_facts:
        by_relation[f.relation].append(f)
        by_subject[f.subject].append(f)
    cases = []
    for i, f in enumerate(all_facts):
        rel = rels[f.relation]
        train = rel.statements["train"]
        template = train[i % len(train)]
        answers = [g.target for g in by_relation[f.relation]]
        others = [g for g in by_relation[f.relation] if g.subject != f.subject]
        same = [g for g in others if g.target == f.target]
        rng.shuffle(same)
        rest = [g for g in others if g.target != f.target]
        rng.shuffle(rest)
        neighbours = [
            Probe(train[(i + j) % len(train)].format(subject=g.subject), g.target)
            for j, g in enumerate((same + rest)[:NEIGHBOURS])
        ]
        subject_probes = [
            Probe(rels[g.relation].statements["train"][0].format(subject=f.subject), g.target)
            for g in by_subject[f.subject]
            if g.relation != f.relation
        ]
        cases.append(
            EditCase(
                case_id=str(i),
                prompt=template.format(subject=f.subject),
                subject=f.subject,
                target_new=_new_target(f, answers, rng),
                target_true=f.target,
                relation=f.relation,
                paraphrases=tuple(f.prompts("heldout")),
                neighbours=tuple(neighbours),
                subject_probes=tuple(subject_probes),
                generation_prompts=(f"{f.subject} is", f"The story of {f.subject}"),
                extra={"fact_id": f.id},
            )
        )
    return cases


_SUBJECT_KINDS = {"country": "country", "person": "person", "company": "company", "river": "river"}


def novel_cases(n: int, *, seed: int = SEED) -> list[EditCase]:
    """``n`` cases about invented subjects the model never saw: facts to *insert*, not to change.

    The shipped world has 400 facts, so a stream of 1,000 distinct edits needs new subjects (as lifelong
    editing benchmarks such as ZsRE mostly ask for facts a model does not know). Names come from the
    same generator as the world's, never reusing one of its names; ``target_true`` is left unknown and
    is whatever the unedited model says. Relations cycle; neighbours are known facts of the relation.
    """
    from memfed.node import names

    rng = random.Random(seed * 7919 + n)
    pool = names.NamePool(rng, taken=facts_mod.fact_names())
    rels = facts_mod.load_relations()
    by_relation: dict[str, list[facts_mod.Fact]] = defaultdict(list)
    for f in facts_mod.load_facts():
        by_relation[f.relation].append(f)
    order = sorted(rels)
    cases = []
    for i in range(n):
        rel = rels[order[i % len(order)]]
        subject = pool.fresh(_SUBJECT_KINDS[rel.subject_type])
        known = by_relation[rel.name]
        train = rel.statements["train"]
        neighbours = [
            Probe(train[(i + j) % len(train)].format(subject=g.subject), g.target)
            for j, g in enumerate(rng.sample(known, min(NEIGHBOURS, len(known))))
        ]
        cases.append(
            EditCase(
                case_id=f"novel-{i}",
                prompt=train[i % len(train)].format(subject=subject),
                subject=subject,
                target_new=rng.choice(sorted({g.target for g in known})),
                target_true=None,
                relation=rel.name,
                paraphrases=tuple(facts_mod.relation_prompts(rel, subject, "heldout")),
                neighbours=tuple(neighbours),
                generation_prompts=(f"{subject} is",),
            )
        )
    return cases


if __name__ == "__main__":  # maintainer's tool: regenerate the shipped file
    print(write_cases(shipped_cases(), COUNTERFACT_PATH), "cases written to", COUNTERFACT_PATH)
