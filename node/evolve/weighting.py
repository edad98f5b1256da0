"""Guards against poisoned feedback: who to believe, per prompt, before anything is trained.

Feedback is votes: a good answer is a vote *for* it, a bad one a vote *against* it, a correction a vote
for the correction. One principal has one vote per prompt (its latest), so repeating an item buys
nothing (and the log's rate limit caps how many a principal may send). Then:

1. **The validation set wins.** A vote about a fact of the module's validation set that contradicts
   the validation answer is dropped (and counts against its principal's trust).
2. **Trust from agreement.** Each principal's trust is how often its votes agree with what the *other*
   principals said about the same prompt (leave-one-out, weighted by their trust, three rounds),
   smoothed with a prior of one agreement and one disagreement so a principal seen once starts at 0.5.
   A principal below ``min_trust`` is ignored altogether: an adversary who marks right answers bad
   and endorses wrong ones disagrees with the honest majority wherever they meet, and loses its say
   even on the prompts where it is alone.
3. **Consensus per prompt.** Votes are summed with their principals' trust; the answer with the most
   weight for it (net of the weight against it) is the one to teach, answers with net weight against
   them are the ones to move away from.

The result says how many distinct principals stand behind it, which the evolver checks
(``min_principals``) before it trains anything.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from memfed.node.evolve.feedback import StoredFeedback
from memfed.node.evolve.validation import Key, fact_of_prompt

TRUST_ROUNDS = 3
EPS = 1e-9


@dataclass(frozen=True)
class Verdict:
    """What the trusted feedback on one prompt says: teach ``chosen`` (None: nothing agreed on), move
    away from ``rejected``; ``weight`` is the trust behind it, ``items`` the feedback rows it rests on."""

    prompt: str
    chosen: str | None
    rejected: tuple[str, ...]
    weight: float
    principals: frozenset[str]
    items: tuple[int, ...]


@dataclass
class Weighing:
    """The verdicts, each principal's trust, and the items dropped with the reason."""

    verdicts: list[Verdict]
    trust: dict[str, float]
    dropped: dict[int, str] = field(default_factory=dict)

    @property
    def principals(self) -> set[str]:
        """Distinct principals whose votes count in at least one verdict."""
        return {p for v in self.verdicts for p in v.principals}

    def split(self, holdout_fraction: float) -> tuple[list[Verdict], list[Verdict]]:
        """(train, held out): verdicts split by a hash of their prompt, so the split is stable as
        feedback accumulates; at least one verdict of each side when there are two or more."""
        usable = [v for v in self.verdicts if v.chosen is not None or v.rejected]
        ranked = sorted(usable, key=lambda v: _unit_hash(v.prompt))
        held = [v for v in ranked if _unit_hash(v.prompt) < holdout_fraction]
        if len(ranked) >= 2:
            held = held or ranked[:1]
            if len(held) == len(ranked):
                held = held[:-1]
        held_prompts = {v.prompt for v in held}
        return [v for v in usable if v.prompt not in held_prompts], held


@dataclass
class _Vote:
    item: int
    principal: str
    positive: str | None  # an answer voted for (a good answer, or a correction)
    negative: str | None  # an answer voted against (a bad answer)


def weigh(
    items: Sequence[StoredFeedback],
    validation: Mapping[Key, str],
    *,
    min_trust: float,
    drop_contradictions: bool = True,
) -> Weighing:
    """Apply the guards of the module docstring to ``items``; ``validation`` maps (subject, relation) to
    the validation set's answer."""
    votes: dict[str, dict[str, _Vote]] = defaultdict(dict)
    for it in items:  # oldest first: a later vote of the same principal on the same prompt replaces it
        positive = it.answer if it.good else it.correction
        votes[it.prompt][it.principal] = _Vote(it.id, it.principal, positive, None if it.good else it.answer)
    superseded = {it.id for it in items} - {v.item for by in votes.values() for v in by.values()}
    dropped = dict.fromkeys(superseded, "superseded by a later vote of the same principal")

    penalties: dict[str, int] = defaultdict(int)
    if drop_contradictions:
        for prompt, by in votes.items():
            truth = validation.get(fact_of_prompt(prompt))  # type: ignore[arg-type]
            if truth is None:
                continue
            for principal, vote in list(by.items()):
                if _contradicts(vote, truth):
                    dropped[vote.item] = f"contradicts the validation set's answer {truth!r}"
                    penalties[principal] += 1
                    del by[principal]

    principals = {v.principal for by in votes.values() for v in by.values()} | set(penalties)
    trust = dict.fromkeys(principals, 0.5)
    for _ in range(TRUST_ROUNDS):
        trust = _trust(votes, trust, penalties)

    verdicts = []
    for prompt, by in votes.items():
        counted = [v for v in by.values() if trust[v.principal] >= min_trust]
        for v in by.values():
            if trust[v.principal] < min_trust:
                dropped[v.item] = f"outweighed: principal trust {trust[v.principal]:.2f} < {min_trust:.2f}"
        if counted:
            verdicts.append(_verdict(prompt, counted, trust))
    return Weighing(verdicts, {p: round(t, 4) for p, t in trust.items()}, dropped)


def _contradicts(vote: _Vote, truth: str) -> bool:
    t = truth.casefold()
    return (vote.positive is not None and vote.positive.casefold() != t) or (
        vote.negative is not None and vote.negative.casefold() == t
    )


@dataclass
class _Tally:
    """Trust-weighted votes for and against each answer (casefolded) of one prompt."""

    pro: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    con: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    @classmethod
    def of(cls, votes: Sequence[_Vote], trust: Mapping[str, float]) -> _Tally:
        tally = cls()
        for v in votes:
            w = trust[v.principal]
            if v.positive is not None:
                tally.pro[v.positive.casefold()] += w
            if v.negative is not None:
                tally.con[v.negative.casefold()] += w
        return tally

    def consensus(self) -> str | None:
        """The answer with the most support *for* it, if more is for it than against it and no other
        answer has as much. Support decides, not net score: a vote "A is wrong, B is right" would
        otherwise count twice against a majority for A."""
        candidates = sorted(((w, a) for a, w in self.pro.items() if w > self.con.get(a, 0.0)), reverse=True)
        if not candidates or (len(candidates) > 1 and candidates[1][0] >= candidates[0][0] - EPS):
            return None
        return candidates[0][1]

    def rejected(self, chosen: str | None) -> list[str]:
        """Answers with more weight against them than for them (never the chosen one)."""
        return [a for a, w in self.con.items() if a != chosen and w > self.pro.get(a, 0.0)]


def _agrees(vote: _Vote, others: _Tally) -> bool | None:
    """Whether ``vote`` agrees with what the other principals said; None when they said nothing of it."""
    best = others.consensus()
    found = []
    if vote.positive is not None:
        a = vote.positive.casefold()
        if best is not None:
            found.append(best == a)
        elif others.con.get(a, 0.0) > others.pro.get(a, 0.0):
            found.append(False)
    if vote.negative is not None:
        a = vote.negative.casefold()
        if best is not None:
            found.append(best != a)
        elif others.con.get(a, 0.0) != others.pro.get(a, 0.0):
            found.append(others.con.get(a, 0.0) > others.pro.get(a, 0.0))
    return all(found) if found else None


def _trust(
    votes: Mapping[str, Mapping[str, _Vote]], trust: Mapping[str, float], penalties: Mapping[str, int]
) -> dict[str, float]:
    agree: dict[str, int] = defaultdict(int)
    disagree: dict[str, int] = defaultdict(int, penalties)
    for by in votes.values():
        if len(by) < 2:
            continue
        for principal, vote in by.items():
            verdict = _agrees(vote, _Tally.of([v for p, v in by.items() if p != principal], trust))
            if verdict is True:
                agree[principal] += 1
            elif verdict is False:
                disagree[principal] += 1
    # Smoothed with one agreement and one disagreement of prior: a principal seen once starts at 0.5.
    return {p: (agree[p] + 1) / (agree[p] + disagree[p] + 2) for p in trust}


def _verdict(prompt: str, votes: Sequence[_Vote], trust: Mapping[str, float]) -> Verdict:
    tally = _Tally.of(votes, trust)
    spelled: dict[str, str] = {}  # casefolded answer -> the spelling its first voter used
    for v in votes:
        for a in (v.positive, v.negative):
            if a is not None:
                spelled.setdefault(a.casefold(), a)
    best = tally.consensus()
    rejected = tally.rejected(best)
    if best is not None:
        weight = tally.pro[best] - tally.con.get(best, 0.0)
    else:
        weight = sum(tally.con[a] - tally.pro.get(a, 0.0) for a in rejected)
    chosen = None if best is None else spelled[best]
    return Verdict(
        prompt, chosen, tuple(spelled[a] for a in rejected), round(weight, 4),
        frozenset(v.principal for v in votes), tuple(sorted(v.item for v in votes)),
    )  # fmt: skip


def _unit_hash(text: str) -> float:
    """A stable number in [0, 1) for ``text``."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64
