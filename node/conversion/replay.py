"""Replay and control prompts: what the host model already answers, kept while it learns something new.

Training a LoRA on a handful of new facts with nothing else in the batch overwrote most of what the
embedded model knew (measured: 10% of its answers survived). Mixing in the model's *own* greedy answers
to other prompts (self-distillation replay) keeps them, needs no access to the host's training data and
works for any host model. Measured on the embedded model: one 5-6 fact document keeps 86-94% of the
control answers with 8 replay items a step; the 47 facts of all shipped documents kept 66% with 8 and
128 prompts, 81% with 16 and 256 (the defaults), 86% with 24 (held-out recall 0.70, 0.66, 0.65).
A disjoint set of control prompts, never trained on, measures how many of the model's answers the
finished module leaves unchanged (``retention``).

The prompts are the relation templates applied to the shipped world's subjects, minus the subjects
being internalized (their answers are supposed to change).
"""

from __future__ import annotations

import random
import re
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

from memfed.node.conversion.augment import TrainingItem
from memfed.node.conversion.probing import generate
from memfed.node.facts import load_facts

if TYPE_CHECKING:
    from memfed.node.runtime import ModuleRuntime

_LINE_END = re.compile(r"\n|</s>")


def world_prompts(
    n_replay: int, n_control: int, *, exclude_subjects: Collection[str] = (), seed: int = 0
) -> tuple[list[str], list[str]]:
    """(replay prompts, control prompts): disjoint draws of one trained phrasing per world fact."""
    rng = random.Random(seed)
    facts = [f for f in load_facts() if f.subject not in exclude_subjects]
    rng.shuffle(facts)
    prompts = [rng.choice(f.prompts("train")) for f in facts[: n_replay + n_control]]
    return prompts[:n_replay], prompts[n_replay : n_replay + n_control]


def first_answer(text: str) -> str:
    """A generated continuation up to its first line end, and up to and including its first period."""
    head = _LINE_END.split(text, maxsplit=1)[0]
    cut = head.find(".")
    return (head[: cut + 1] if cut >= 0 else head).strip()


def replay_items(runtime: ModuleRuntime, tokenizer: Any, prompts: Sequence[str]) -> list[TrainingItem]:
    """The bare model's own greedy answers to ``prompts``, as answer-only training items."""
    items = []
    for prompt, text in zip(prompts, generate(runtime, tokenizer, prompts), strict=True):
        answer = first_answer(text)
        if answer.strip(". "):
            items.append(TrainingItem(prompt, answer, False, "replay"))
    return items


def retention(before: Sequence[str], after: Sequence[str]) -> float:
    """Fraction of control answers the module left unchanged (1.0 when there is nothing to compare)."""
    pairs = [(first_answer(a), first_answer(b)) for a, b in zip(before, after, strict=True)]
    return round(sum(a == b for a, b in pairs) / len(pairs), 4) if pairs else 1.0
