"""Self-evolving modules (memfed.node.evolve): the feedback log's refusals, the poison guards, and the
evolver's promote / discard / wait / roll-back decisions on a real internalized module."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from memfed.errors import CapacityError, InvalidArgumentError, NotFoundError
from memfed.node.evolve.feedback import MAX_TEXT_CHARS, FeedbackItem, FeedbackLog, StoredFeedback
from memfed.node.evolve.settings import EvolveSettings
from memfed.node.evolve.validation import fact_of_prompt
from memfed.node.evolve.weighting import weigh

CUBE = "test.evolve"
SETTINGS = EvolveSettings(threshold=20, min_principals=3, regression_min_samples=6, steps=40)


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def item(principal: str = "user:a", **kw: Any) -> FeedbackItem:
    fields = {"cube_id": CUBE, "principal": principal, "prompt": "Question: Q?\nAnswer:", "answer": "X"}
    fields.update(kw)
    fields.setdefault("good", "correction" not in kw)
    return FeedbackItem(**fields)  # type: ignore[arg-type]


# -- the feedback log ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"prompt": "   "}, "prompt is empty"),
        ({"answer": ""}, "answer is empty"),
        ({"prompt": "x" * (MAX_TEXT_CHARS + 1)}, "the limit is"),
        ({"answer": "y" * (MAX_TEXT_CHARS + 1)}, "the limit is"),
        ({"good": False, "correction": "z" * (MAX_TEXT_CHARS + 1)}, "the limit is"),
        ({"good": False, "correction": " "}, "correction is empty"),
        ({"good": True, "correction": "Y"}, "also gives a correction"),
        ({"good": False, "correction": "x."}, "repeats the answer"),
        ({"principal": ""}, "principal"),
        ({"cube_id": "bad id!"}, "cube id"),
        ({"version": "one"}, "semantic version"),
    ],
)
def test_bad_feedback_is_refused_and_changes_nothing(
    tmp_path: Path, change: dict[str, Any], words: str
) -> None:
    with FeedbackLog(tmp_path / "feedback.db") as log:
        log.add(item())
        with pytest.raises(InvalidArgumentError) as err:
            log.add(dataclasses.replace(item(), **change))
        assert words in err.value.message and err.value.hint
        assert [it.answer for it in log.pending(CUBE)] == ["X"]


def test_rate_limit_per_principal(tmp_path: Path) -> None:
    clock = Clock()
    settings = dataclasses.replace(SETTINGS, rate_limit_per_hour=3)
    with FeedbackLog(tmp_path / "feedback.db", settings=settings, clock=clock) as log:
        for _ in range(3):
            log.add(item("user:a"))
        with pytest.raises(CapacityError) as err:
            log.add(item("user:a"))
        assert "limit is 3" in err.value.message and err.value.hint
        assert len(log.pending(CUBE)) == 3  # the refused item was not written
        log.add(item("user:b"))  # the limit is per principal
        clock.now += 3601  # a new hour
        log.add(item("user:a"))
        assert len(log.pending(CUBE)) == 5


def test_feedback_is_durable_and_normalized(tmp_path: Path) -> None:
    with FeedbackLog(tmp_path / "feedback.db") as log:
        row = log.add(item(answer="  Quorn. ", good=False, correction=" Vell."))
    with FeedbackLog(tmp_path / "feedback.db") as log:
        (stored,) = log.pending(CUBE)
    assert (stored.id, stored.answer, stored.correction, stored.good) == (row, "Quorn", "Vell", False)


# -- poison guards ---------------------------------------------------------------------------------------


def stored(
    i: int, principal: str, prompt: str, answer: str, good: bool, correction: str | None = None
) -> Any:
    return StoredFeedback(i, CUBE, "1.0.0", principal, prompt, answer, good, correction, 0.0, None)


def test_majority_and_trust_outweigh_an_adversary() -> None:
    items, n = [], 0
    for p in range(4):  # four prompts, the module right on each; three honest users, one adversary
        prompt = f"Question: q{p}?\nAnswer:"
        for user in ("user:a", "user:b", "user:c"):
            items.append(stored(n := n + 1, user, prompt, f"right{p}", True))
        items.append(stored(n := n + 1, "user:evil", prompt, f"right{p}", False, f"wrong{p}"))
    lone = "Question: only the adversary asked?\nAnswer:"
    items.append(stored(n := n + 1, "user:evil", lone, "right", False, "wrong"))
    w = weigh(items, {}, min_trust=0.35)
    assert w.trust["user:evil"] < 0.35 < w.trust["user:a"]
    assert w.principals == {"user:a", "user:b", "user:c"}
    assert {v.prompt: v.chosen for v in w.verdicts} == {
        f"Question: q{p}?\nAnswer:": f"right{p}" for p in range(4)
    }
    assert all(v.rejected == () for v in w.verdicts)
    assert sum("outweighed" in reason for reason in w.dropped.values()) == 5  # even where it was alone


def test_one_vote_per_principal_and_prompt() -> None:
    prompt = "Question: q?\nAnswer:"
    items = [stored(i, "user:spam", prompt, "A", False, "B") for i in range(1, 6)]
    items.append(stored(6, "user:a", prompt, "A", True))
    items.append(stored(7, "user:b", prompt, "A", True))
    w = weigh(items, {}, min_trust=0.0)
    (verdict,) = w.verdicts
    assert verdict.chosen == "A" and verdict.items == (5, 6, 7)  # the spammer's latest vote only
    assert sum("superseded" in r for r in w.dropped.values()) == 4


def test_feedback_contradicting_the_validation_set_is_dropped() -> None:
    prompt = "The capital of Brigis is"
    assert fact_of_prompt(prompt) == ("Brigis", "capital")
    items = [
        stored(1, "user:a", prompt, "Dridaekirn", False, "Wrongtown"),
        stored(2, "user:b", prompt, "X", True),
    ]
    w = weigh(items, {("Brigis", "capital"): "Dridaekirn"}, min_trust=0.0)
    assert set(w.dropped) == {1, 2} and w.verdicts == []
    assert "contradicts the validation set" in w.dropped[1]


def test_prompts_are_recognized_in_every_phrasing() -> None:
    from memfed.node.facts import load_relations, relation_prompts

    rel = load_relations()["headquarters"]
    for split in ("train", "heldout"):
        for prompt in relation_prompts(rel, "Keiskeis Foundry", split):  # type: ignore[arg-type]
            assert fact_of_prompt(prompt) == ("Keiskeis Foundry", "headquarters")
    assert fact_of_prompt("Tell me a story") is None


# -- the evolver, on a real module ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A module internalized from a synthetic document that leaves out some of its facts (the module
    knows part of what users ask), registered in a store with the document in a plaintext vault."""
    from memfed.node.conversion.augment import all_facts
    from memfed.node.conversion.documents import parse_document, parse_fact
    from memfed.node.conversion.internalize import InternalizeSettings, internalize
    from memfed.node.conversion.synth import synthetic_document
    from memfed.node.conversion.train import LoraTrainConfig
    from memfed.node.models import load_host_model
    from memfed.node.plaintext import PlaintextMemory
    from memfed.node.store import CubeStore

    model, tok = load_host_model(default_model_dir)
    full = synthetic_document(200, tok, seed=3, doc_id="doc/evolve")
    facts = all_facts([full])
    untaught = {f.key for f in facts[1::3]}
    kept = [s for s in full.sentences() if (f := parse_fact(s)) is None or f.key not in untaught]
    doc = parse_document(" ".join(kept), doc_id="doc/evolve", title="evolve test")
    root = tmp_path_factory.mktemp("evolve")
    store, vault = CubeStore(root / "store"), PlaintextMemory(root / "vault.db")
    settings = InternalizeSettings(train=LoraTrainConfig(steps=60), min_recall=0.0)
    _, cube = internalize(model, tok, [doc], cube_id=CUBE, store=store, vault=vault, settings=settings)
    yield {
        "model": model,
        "tok": tok,
        "store": store,
        "vault": vault,
        "cube": cube,
        "facts": facts,
        "root": root,
    }
    store.close()
    vault.close()


def ask_and_judge(world: dict[str, Any], log: FeedbackLog, users: list[str], truth: dict[str, str]) -> None:
    """Each user asks every prompt of ``truth`` and judges the module's answer against it honestly."""
    from memfed.node.conversion.probing import clean_answer, generate, module_loaded

    prompts = list(truth)
    with module_loaded(world["model"], world["store"].get(CUBE)) as (rt, ref):
        answers = [clean_answer(a) or "-" for a in generate(rt, world["tok"], prompts, [ref])]
    for user in users:
        for prompt, answer in zip(prompts, answers, strict=True):
            right = answer.rstrip(".") == truth[prompt]
            log.add(FeedbackItem(CUBE, user, prompt, answer, right, None if right else truth[prompt]))


def train_prompts(facts: list[Any]) -> dict[str, str]:
    from memfed.node.facts import load_relations, relation_prompts

    rels = load_relations()
    return {p: f.target for f in facts for p in relation_prompts(rels[f.relation], f.subject, "train")}


@pytest.fixture(scope="module")
def promoted(world: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The honest path: three users' feedback on every fact's trained phrasings, one evolver step."""
    from memfed.node.evolve.evolver import Evolver

    log = FeedbackLog(world["root"] / "feedback.db", settings=SETTINGS, store=world["store"])
    evolver = Evolver(world["model"], world["tok"], world["store"], log, SETTINGS, vault=world["vault"])
    ask_and_judge(world, log, ["user:a", "user:b", "user:c"], train_prompts(world["facts"]))
    pending = len(log.pending(CUBE))
    decision = evolver.step(CUBE)
    yield {"log": log, "evolver": evolver, "decision": decision, "pending": pending}
    log.close()


def test_promotion_publishes_the_next_version(world: dict[str, Any], promoted: dict[str, Any]) -> None:
    from memfed.node.conversion.internalize import PROBE_KEYS_PARAM
    from memfed.node.evolve.validation import validation_set

    d, store = promoted["decision"], world["store"]
    assert d.action == "promoted", d.reason
    assert (d.from_version, d.to_version) == ("1.0.0", "1.1.0")
    assert store.current_version(CUBE) == "1.1.0"
    new, parent = store.get(CUBE, "1.1.0"), world["cube"]
    assert list(new.manifest.version_chain) == [parent.manifest.digest]
    assert new.manifest.origin.method == "evolve"
    assert new.manifest.origin.params[PROBE_KEYS_PARAM] == parent.manifest.origin.params[PROBE_KEYS_PARAM]
    f = d.figures
    assert f["feedback_after"] > f["feedback_before"]
    assert f["validation_after"] >= f["validation_before"] - SETTINGS.max_validation_drop
    assert f["principals"] == 3 and f["validation_probes"] > 0
    # The validation set came from the origin: the source document in the vault, probed as at build.
    log = promoted["log"]
    assert len(validation_set(new, log, world["vault"]).probes) == f["validation_probes"]
    assert log.pending(CUBE) == []  # the feedback it learned from is used
    with FeedbackLog(world["root"] / "feedback.db") as reopened:  # decisions are durable
        assert [x.action for x in reopened.decisions(CUBE)] == ["promoted"]
        assert reopened.decisions(CUBE)[0].figures == d.figures


def test_too_few_principals_waits_and_changes_nothing(
    world: dict[str, Any], promoted: dict[str, Any]
) -> None:
    from memfed.node.evolve.evolver import Evolver

    with FeedbackLog(world["root"] / "few.db", settings=SETTINGS, store=world["store"]) as log:
        evolver = Evolver(world["model"], world["tok"], world["store"], log, SETTINGS, vault=world["vault"])
        before = world["store"].versions(CUBE)
        d = evolver.step(CUBE)
        assert d.action == "waiting" and "20 are needed" in d.reason
        ask_and_judge(world, log, ["user:a", "user:b"], train_prompts(world["facts"]))
        d = evolver.step(CUBE)
        assert d.action == "waiting" and "2 distinct principal(s); a change needs 3" in d.reason
        assert "train_seconds" not in d.figures
        assert world["store"].versions(CUBE) == before
        assert [x.action for x in log.decisions(CUBE)] == ["waiting"]  # the latest wait replaces the last


def test_discard_when_validation_drops(world: dict[str, Any], promoted: dict[str, Any]) -> None:
    """Without the contradiction guard, users who agree on wrong answers for the module's own facts
    get a candidate that learned them; the validation gate discards it and the store keeps its versions."""
    from memfed.node.conversion.augment import heldout_probes
    from memfed.node.evolve.evolver import Evolver
    from memfed.node.evolve.validation import validation_set

    settings = dataclasses.replace(SETTINGS, drop_contradictions=False)
    store = world["store"]
    with FeedbackLog(world["root"] / "poison.db", settings=settings, store=store) as log:
        evolver = Evolver(world["model"], world["tok"], store, log, settings, vault=world["vault"])
        keys = {(p.subject, p.relation) for p in validation_set(store.get(CUBE), log, world["vault"]).probes}
        known = [f for f in world["facts"] if f.key in keys]
        assert len(heldout_probes(known)) > 0
        swapped = {f.key: known[(i + 1) % len(known)].target for i, f in enumerate(known)}
        lies = {p: swapped[k] for p, _ in train_prompts(known).items() if (k := fact_of_prompt(p)) in swapped}
        ask_and_judge(world, log, ["user:x", "user:y", "user:z"], lies)
        before = store.versions(CUBE)
        d = evolver.step(CUBE)
        assert d.action == "discarded", d.reason
        assert "validation recall" in d.reason and "drops by more than 0.010" in d.reason
        assert d.figures["validation_before"] - d.figures["validation_after"] > 0.01
        assert store.versions(CUBE) == before and store.current_version(CUBE) == "1.1.0"
        assert len(log.pending(CUBE)) == d.figures["pending"]  # discarded: the feedback stays pending
        assert evolver.step(CUBE).action == "waiting"  # and the next attempt waits for new feedback


def test_rollback_on_live_regression(world: dict[str, Any], promoted: dict[str, Any]) -> None:
    from memfed.node.lifecycle import Lifecycle

    log, evolver, store = promoted["log"], promoted["evolver"], world["store"]
    assert store.current_version(CUBE) == "1.1.0"
    for i in range(3):  # below regression_min_samples: no verdict yet
        log.add(FeedbackItem(CUBE, f"user:{'abc'[i]}", f"Question: q{i}?\nAnswer:", "meh", False))
    assert evolver.step(CUBE).action == "waiting"
    for i in range(6):
        log.add(FeedbackItem(CUBE, f"user:{'abc'[i % 3]}", f"Question: r{i}?\nAnswer:", "meh", False))
    d = evolver.step(CUBE)
    assert d.action == "rolled_back", d.reason
    assert (d.from_version, d.to_version) == ("1.1.0", "1.0.0")
    assert d.figures["good_rate_live"] == 0.0 and d.figures["good_rate_before"] > SETTINGS.regression_margin
    assert store.current_version(CUBE) == "1.0.0"
    assert Lifecycle(store).state(CUBE, "1.1.0") == "archived"
    assert [x.action for x in log.decisions(CUBE)][-1] == "rolled_back"
    with pytest.raises(NotFoundError):  # feedback on a version the store no longer serves is refused
        log.add(FeedbackItem(CUBE, "user:a", "Question: q?\nAnswer:", "x", True, version="9.9.9"))
