"""Prompts as token ids: where the subject sits, and the answer that follows after one space.

Every editing step needs the same two facts about a prompt: the index of the subject's last token (where
ROME reads its key and the codebook matches) and the target's token ids as the model would continue the
prompt. Computing them in one place keeps training, evaluation and editing byte-for-byte consistent with
how the embedded model was taught (``memfed.node.facts``: the answer follows after exactly one space).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from memfed.errors import InvalidArgumentError


@dataclass(frozen=True)
class Encoded:
    """A prompt's token ids, the subject's token span and the answer's ids when there is one."""

    ids: tuple[int, ...]
    subject_first: int  # index into ids of the subject's first token; -1 when the prompt has no subject
    subject_last: int  # index of the subject's last token; -1 when the prompt has no subject
    target: tuple[int, ...] = ()

    @property
    def full(self) -> tuple[int, ...]:
        return self.ids + self.target

    def positions(self, token: str) -> list[int]:
        """Subject token positions: ``"last"`` (ROME's choice), ``"first"``, or ``"all"``."""
        if self.subject_last < 0:
            return []
        if token == "last":
            return [self.subject_last]
        if token == "first":
            return [self.subject_first]
        return list(range(self.subject_first, self.subject_last + 1))


def subject_span(tokenizer: Any, prompt: str, subject: str) -> tuple[int, int]:
    """(first, last) index of the tokens covering ``subject`` (its last occurrence) in the prompt's ids."""
    if not subject or not subject.strip():
        raise InvalidArgumentError("the subject is empty", hint="name the entity the fact is about")
    start = prompt.rfind(subject)
    if start < 0:
        raise InvalidArgumentError(
            f"subject {subject!r} does not occur in the prompt {prompt!r}",
            hint="the subject must appear in the prompt exactly as written (same case and spelling)",
        )
    end = start + len(subject)
    if tokenizer.is_fast:
        offsets = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
        covered = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
        if covered:
            return covered[0], covered[-1]
    # Slow tokenizers: count the tokens of the text before the subject and up to its end.
    last = len(tokenizer(prompt[:end])["input_ids"]) - 1
    first = len(tokenizer(prompt[:start])["input_ids"]) if start else last
    return min(first, last), last


def target_ids(tokenizer: Any, target: str) -> tuple[int, ...]:
    """The answer's ids as a continuation: one leading space, no special tokens."""
    if not target or not target.strip():
        raise InvalidArgumentError("the target is empty", hint="give the answer the model should produce")
    ids = tuple(tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"])
    if not ids:
        raise InvalidArgumentError(f"target {target!r} encodes to no tokens")
    return ids


def encode(tokenizer: Any, prompt: str, subject: str | None = None, target: str | None = None) -> Encoded:
    """``prompt`` (with special tokens, as the model was taught), the subject's span and the target."""
    ids = tuple(tokenizer(prompt)["input_ids"])
    first, last = subject_span(tokenizer, prompt, subject) if subject is not None else (-1, -1)
    return Encoded(ids, first, last, target_ids(tokenizer, target) if target is not None else ())


@dataclass
class Batch:
    """Right-padded ids of several sequences. No attention mask is needed: with right padding and causal
    attention real tokens never attend to pads, and pads are never read."""

    ids: torch.Tensor  # (b, t)
    lengths: list[int]


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu") -> Batch:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
    return Batch(ids.to(device), [len(s) for s in seqs])


def pad_id(tokenizer: Any) -> int:
    pid = tokenizer.pad_token_id
    if pid is None:
        pid = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return int(pid)


def target_logprobs(logits: torch.Tensor, items: Sequence[Encoded]) -> list[torch.Tensor]:
    """Per item, the log-probabilities of its target tokens (teacher forced) from a batch's logits."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    out = []
    for i, it in enumerate(items):
        n, t = len(it.ids), len(it.target)
        pos = torch.arange(n - 1, n - 1 + t, device=logits.device)
        tgt = torch.tensor(it.target, device=logits.device)
        out.append(logp[i, pos, tgt])
    return out
