"""What a candidate is trained on: the trusted verdicts as preferred answers and preference pairs.

A verdict says "for this prompt, answer X, not Y". Taught as that one prompt-answer pair, the fact
stays tied to the user's phrasing: measured on the embedded model, corrections of a fact's trained
phrasings raised recall on its held-out phrasings hardly at all. So when a prompt is recognized as a
relation template (``fact_of_prompt``), the agreed answer is taught the way internalization teaches a
fact: every trained phrasing as a statement to produce, a cloze and a question
(``memfed.node.conversion.augment.fact_items``), weighted by the trust behind it. Two exclusions keep the
gates honest: no augmented item uses a *held-out* feedback prompt (those measure the candidate), and
where verdicts on one fact disagree, only the answer with the most trust behind it is augmented.
Preference pairs (DPO) stay on the prompts users actually judged.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from memfed.node.conversion.augment import fact_items
from memfed.node.conversion.documents import DocFact
from memfed.node.evolve.objective import Pair, Preferred
from memfed.node.evolve.validation import Key, fact_of_prompt
from memfed.node.evolve.weighting import Verdict


def training_examples(
    train: Sequence[Verdict], held: Sequence[Verdict]
) -> tuple[list[Preferred], list[Pair]]:
    """(preferred answers, preference pairs) from the train verdicts; see the module docstring."""
    held_prompts = {v.prompt for v in held}
    preferred: dict[tuple[str, str, bool], Preferred] = {}

    def prefer(item: Preferred) -> None:
        key = (item.prompt, item.answer, item.whole)
        if item.prompt not in held_prompts and (key not in preferred or preferred[key].weight < item.weight):
            preferred[key] = item

    support: dict[Key, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for v in train:
        if v.chosen is None:
            continue
        prefer(Preferred(v.prompt, v.chosen, v.weight))
        key = fact_of_prompt(v.prompt)
        if key is not None:
            support[key][v.chosen] += v.weight
    for (subject, relation), answers in support.items():
        answer, weight = max(answers.items(), key=lambda kv: kv[1])
        for item in fact_items(DocFact(subject, relation, answer)):
            prefer(Preferred(item.prompt, item.answer, weight, whole=item.whole))
    pairs = [Pair(v.prompt, v.chosen, r, v.weight) for v in train if v.chosen for r in v.rejected]
    return list(preferred.values()), pairs
