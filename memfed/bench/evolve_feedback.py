"""Self-evolving modules: accuracy before and after rounds of user feedback, honest and 20% poisoned.

Setup, on the embedded model: a synthetic document of invented facts (seeded). Its facts are split in
two: the **validation facts** (the module's own validation set, stored with
``FeedbackLog.set_validation``: their held-out phrasings) and the **question facts**, which simulated
users ask about; kept apart so the guard that trusts the validation set cannot stand in for the users.
The module is internalized from the document *without half of the question facts*, so it knows part of
what it is asked (it answers the taught half, and confidently gets the other half wrong). The evolver
never sees the answer key; the users do:

- each round, each of 10 users asks 12 questions drawn from the question facts' *trained* phrasings,
  reads the module's greedy answer, and gives ``good`` when it is the answer key's, else ``bad`` with the
  key's answer as correction;
- an adversarial user does the opposite: marks right answers bad with a wrong correction (another
  fact's value of the same relation) and endorses wrong answers as good;
- after each round the evolver takes one ``step`` (train, validate, promote or discard).

Measured: accuracy on the question facts' *held-out* phrasings (no user asked those) before and after 5
rounds, with no adversary and with 2 of 10 users adversarial (both runs start from the same module);
recall on the validation set before and after; promotions; seconds per round (asking, judging and the
evolver's step). Goals (memfed.bench.goals): +10 points after 5 rounds, and no drop below the starting
accuracy with 20% adversarial feedback. Figures are single seeded runs on a shared CPU.
"""

from __future__ import annotations

import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memfed.bench.harness import one_torch_thread

DOC_TOKENS = 512  # 32 facts: 16 validation facts, 16 question facts (48 held-out questions)
QUICK_DOC_TOKENS = 256
INTERNALIZE_STEPS = 60  # the taught facts are learned (held-out recall ~0.6), the others not at all
USERS = 10
QUESTIONS_PER_USER = 12
ROUNDS = 5
CUBE_ID = "bench.evolve.feedback"


@dataclass(frozen=True)
class _Question:
    prompt: str
    truth: str
    wrong: str  # what an adversary claims instead


def run_part(quick: bool) -> dict[str, float]:
    """The figures of this bench (fractions 0-1, seconds); ``quick``: a smaller document, 2 rounds."""
    with one_torch_thread():
        return _run(quick)


def _run(quick: bool) -> dict[str, float]:
    from memfed.node.conversion.augment import all_facts, heldout_probes
    from memfed.node.conversion.documents import parse_document, parse_fact
    from memfed.node.conversion.internalize import InternalizeSettings, internalize
    from memfed.node.conversion.synth import synthetic_document
    from memfed.node.conversion.train import LoraTrainConfig
    from memfed.node.models import default_model_dir, load_host_model
    from memfed.node.store import CubeStore

    model, tok = load_host_model(default_model_dir())
    doc = synthetic_document(QUICK_DOC_TOKENS if quick else DOC_TOKENS, tok, seed=7, doc_id="bench/evolve")
    facts = all_facts([doc])
    validation_facts, question_facts = facts[0::2], facts[1::2]
    rounds = 2 if quick else ROUNDS
    # The module's document leaves out every other question fact: it knows half of what users ask.
    untaught = {f.key for f in question_facts[1::2]}
    kept = [s for s in doc.sentences() if (f := parse_fact(s)) is None or f.key not in untaught]
    module_doc = parse_document(" ".join(kept), doc_id=doc.doc_id, title=doc.title)
    settings = InternalizeSettings(train=LoraTrainConfig(steps=INTERNALIZE_STEPS), min_recall=0.0)
    _, cube = internalize(model, tok, [module_doc], cube_id=CUBE_ID, settings=settings)
    validation = heldout_probes(validation_facts)
    heldout = heldout_probes(question_facts)
    questions = _questions(question_facts)

    figures: dict[str, float] = {"evolve_rounds": float(rounds)}
    with tempfile.TemporaryDirectory(prefix="memfed-evolve-bench-") as tmp:
        runs = {}
        for name, adversaries in (("honest", 0), ("poisoned", USERS // 5)):
            with CubeStore(Path(tmp) / name) as store:
                store.put(cube.manifest, cube.payload)
                runs[name] = _simulate(
                    model, tok, store, Path(tmp) / name, questions, validation, heldout, rounds, adversaries
                )
    honest, poisoned = runs["honest"], runs["poisoned"]
    figures.update(
        evolve_acc_before=honest["acc_before"],
        evolve_acc_after=honest["acc_after"],
        evolve_acc_after_poisoned=poisoned["acc_after"],
        evolve_validation_before=honest["validation_before"],
        evolve_validation_after=honest["validation_after"],
        evolve_validation_after_poisoned=poisoned["validation_after"],
        evolve_promotions=honest["promotions"],
        evolve_promotions_poisoned=poisoned["promotions"],
        evolve_seconds_per_round=round(honest["seconds"] / rounds, 2),
        evolve_question_facts=float(len(question_facts)),
        evolve_heldout_questions=float(len(heldout)),
        evolve_validation_probes=float(len(validation)),
    )
    return figures


def _questions(facts: list[Any]) -> list[_Question]:
    """Every trained phrasing of every question fact, with its answer and an adversary's wrong one."""
    from memfed.node.facts import load_relations, relation_prompts

    rels = load_relations()
    out = []
    for i, fact in enumerate(facts):
        same = [f.target for f in facts if f.relation == fact.relation and f.target != fact.target]
        others = same or [f.target for f in facts if f.target != fact.target]
        wrong = others[i % len(others)]
        out += [
            _Question(p, fact.target, wrong)
            for p in relation_prompts(rels[fact.relation], fact.subject, "train")
        ]
    return out


def _simulate(
    model: Any,
    tok: Any,
    store: Any,
    root: Path,
    questions: list[_Question],
    validation: list[Any],
    heldout: list[Any],
    rounds: int,
    adversaries: int,
) -> dict[str, float]:
    """``rounds`` of asking, judging and one evolver step; accuracy and validation before and after."""
    from memfed.node.conversion.probing import clean_answer, generate, module_loaded, rate, recall
    from memfed.node.evolve.evolver import Evolver
    from memfed.node.evolve.feedback import FeedbackItem, FeedbackLog, normalize_answer
    from memfed.node.runtime import ModuleRuntime

    clock = _Clock()
    log = FeedbackLog(root / "feedback.db", clock=clock, store=store)
    log.set_validation(CUBE_ID, validation)
    rt = ModuleRuntime(model)
    evolver = Evolver(model, tok, store, log, runtime=rt)
    rng = random.Random(11)
    users = [f"user:{i}" for i in range(USERS)]
    bad_users = set(users[:adversaries])

    def measure() -> tuple[float, float]:
        with module_loaded(model, store.get(CUBE_ID), rt) as (_, ref):
            return rate(recall(rt, tok, heldout, [ref])), rate(recall(rt, tok, validation, [ref]))

    acc_before, validation_before = measure()
    seconds = 0.0
    promotions = 0
    try:
        for _ in range(rounds):
            t0 = time.perf_counter()
            asked = [(u, q) for u in users for q in rng.sample(questions, QUESTIONS_PER_USER)]
            with module_loaded(model, store.get(CUBE_ID), rt) as (_, ref):
                answers = generate(rt, tok, [q.prompt for _, q in asked], [ref])
            for (user, q), text in zip(asked, answers, strict=True):
                answer = normalize_answer(clean_answer(text)) or "(no answer)"
                right = answer.casefold() == q.truth.casefold()
                if user in bad_users:
                    good, correction = not right, (q.wrong if right else None)
                else:
                    good, correction = right, (None if right else q.truth)
                log.add(FeedbackItem(CUBE_ID, user, q.prompt, answer, good, correction))
            decision = evolver.step(CUBE_ID)
            promotions += decision.action == "promoted"
            seconds += time.perf_counter() - t0
            clock.advance(3600.0)  # a round is an hour of use: the rate limit window starts afresh
        acc_after, validation_after = measure()
    finally:
        rt.close()
        log.close()
    return {
        "acc_before": acc_before,
        "acc_after": acc_after,
        "validation_before": validation_before,
        "validation_after": validation_after,
        "promotions": float(promotions),
        "seconds": seconds,
    }


class _Clock:
    """Simulated Unix time, so rounds can be hours apart without waiting."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
