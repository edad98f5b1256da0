"""Keys at a down-projection (its inputs) read at the subject's tokens under varied contexts.

ROME's key k* is the down-projection input at the subject's last token *averaged over varied prefixes*,
so the update fires for the subject whatever text comes before it (what makes paraphrases work). Two
sources of prefixes, both deterministic:

- ``context_prefixes``: short texts sampled from the model itself (seeded), as ROME does: no corpus
  needed, any model. ROME and MEMIT use them; their soft, linear updates tolerate odd contexts.
- ``corpus_prefixes``: openings of real text (the statistics corpus). The codebook uses them: its hard
  radius needs keys from the contexts a subject actually appears in.
"""

from __future__ import annotations

import random
import weakref
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch

from memfed.node.editing.arch import ModelLayout
from memfed.node.editing.hooks import patch_output, record
from memfed.node.editing.stats import corpus_digest
from memfed.node.editing.text import Encoded, encode, pad_batch, pad_id

_SEEDS = ("The", "In", "A", "Question:", "It")
_CORPUS_PREFIX_MEMO: dict[tuple[str, int, int], tuple[str, ...]] = {}
_PREFIX_MEMO: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple[int, int], tuple[str, ...]]] = (
    weakref.WeakKeyDictionary()
)


def corpus_prefixes(texts: Sequence[str], n: int = 12, *, seed: int = 0) -> tuple[str, ...]:
    """``""`` plus ``n`` text openings cut at a random word from ``texts`` (seeded), each ending in a space.

    What comes right before a subject moves its key a lot in a small model; openings of real text (the
    statistics corpus) are the contexts a subject actually appears in, so keys averaged over them match
    paraphrases better than keys averaged over sampled prefixes.
    """
    memo = (corpus_digest(texts), n, seed)
    if memo not in _CORPUS_PREFIX_MEMO:
        rng = random.Random(seed)
        out = [""]
        pool = [t.replace("\n", " ").split() for t in texts if len(t.split()) > 1]
        while len(out) <= n and pool:
            words = rng.choice(pool)
            out.append(" ".join(words[: rng.randint(1, len(words) - 1)]) + " ")
        _CORPUS_PREFIX_MEMO[memo] = tuple(out)
    return _CORPUS_PREFIX_MEMO[memo]


@torch.no_grad()
def context_prefixes(
    model: torch.nn.Module, tokenizer: Any, *, n: int = 4, length: int = 8
) -> tuple[str, ...]:
    """``""`` plus ``n`` short texts sampled from the model (seeded), each ending in a sentence break."""
    memo = _PREFIX_MEMO.setdefault(model, {})
    if (n, length) in memo:
        return memo[(n, length)]
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(1234)
    out = [""]
    for i in range(n):
        ids = list(tokenizer(_SEEDS[i % len(_SEEDS)])["input_ids"])
        for _ in range(length):
            logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].float().cpu()
            top = torch.topk(logits, 5)
            choice = top.indices[torch.multinomial(torch.softmax(top.values, -1), 1, generator=gen)].item()
            if choice == tokenizer.eos_token_id:
                break
            ids.append(int(choice))
        text = tokenizer.decode(ids, skip_special_tokens=True).replace("\n", " ").strip()
        if text and text[-1] not in ".?!":
            text += "."
        out.append(text + " ")
    memo[(n, length)] = tuple(out)
    return memo[(n, length)]


@dataclass(frozen=True)
class GroupReads:
    """Reads of one request: ``labels[i]`` = (subject token ids as tokenized there, index in them), and
    per read name a (p, dim) tensor whose row i belongs to ``labels[i]``."""

    labels: list[tuple[tuple[int, ...], int]]
    tensors: dict[str, torch.Tensor]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]


def subject_groups(
    enc: Sequence[Encoded], rows: Iterable[int], token: str
) -> dict[tuple[tuple[int, ...], int], list[tuple[int, int]]]:
    """The (row, position) reads of one request's ``rows`` of ``enc`` grouped by (the subject's token ids
    as tokenized there, index in them): each group is one key (see ``read_groups``)."""
    groups: dict[tuple[tuple[int, ...], int], list[tuple[int, int]]] = {}
    for i in rows:
        e = enc[i]
        form = e.ids[e.subject_first : e.subject_last + 1]
        for pos in e.positions(token):
            groups.setdefault((form, pos - e.subject_first), []).append((i, pos))
    return groups


@torch.no_grad()
def read_groups(
    layout: ModelLayout,
    tokenizer: Any,
    requests: Sequence[tuple[str, str]],
    prefixes: Sequence[str],
    reads: dict[str, tuple[torch.nn.Module, bool]],
    token: str = "last",
    *,
    patch: tuple[torch.nn.Module, torch.Tensor] | None = None,
) -> list[GroupReads]:
    """Per (prompt, subject): each read module's input (``True``) or output at the subject's ``token``
    positions, averaged over ``prefixes`` per (tokenization of the subject, position in it).

    ``patch`` = (module, deltas (n requests, dim)): read with ``deltas[r]`` added to the module's output
    at request r's subject positions, i.e. what a value written there makes of later layers.

    A subject at the very start of a text is tokenized differently from one after a space (byte-level
    BPE: ``Veltria`` vs `` Veltria``), so its keys are different vectors; averaging the two forms, as
    ROME's single k* does, would fit neither. Each form keeps its own group instead.
    """
    enc = [encode(tokenizer, pre + prompt, subject) for prompt, subject in requests for pre in prefixes]
    device = next(layout.model.parameters()).device
    batch = pad_batch([e.ids for e in enc], pad_id(tokenizer), device)
    ins = {n: m for n, (m, is_input) in reads.items() if is_input}
    outs = {n: m for n, (m, is_input) in reads.items() if not is_input}
    with ExitStack() as stack:
        if patch is not None:
            module, deltas = patch
            at = [(i, pos, i // len(prefixes)) for i, e in enumerate(enc) for pos in e.positions(token)]
            rows, cols, owner = (torch.tensor(x, device=device) for x in zip(*at, strict=True))

            def add(out: torch.Tensor) -> torch.Tensor:
                out = out.clone()
                out[rows, cols] = out[rows, cols] + deltas.to(out)[owner]
                return out

            stack.enter_context(patch_output(module, add))
        seen_in = stack.enter_context(record(ins, inputs=True))
        seen_out = stack.enter_context(record(outs, inputs=False))
        layout.model(input_ids=batch.ids)
    seen = {**seen_in, **seen_out}
    result = []
    for r in range(len(requests)):
        groups = subject_groups(enc, range(r * len(prefixes), (r + 1) * len(prefixes)), token)
        tensors = {
            name: torch.stack(
                [torch.stack([t[i, pos] for i, pos in at]).float().mean(0) for at in groups.values()]
            )
            for name, t in seen.items()
        }
        result.append(GroupReads(list(groups), tensors))
    return result


@torch.no_grad()
def window_keys(
    layout: ModelLayout,
    tokenizer: Any,
    layer: int,
    prompt: str,
    subject: str,
    prefixes: Sequence[str],
    window: int,
) -> dict[tuple[int, ...], torch.Tensor]:
    """Per tokenization of the subject: the down-projection inputs at its last ``window`` tokens (last
    first) under each prefix that gives that tokenization, as (contexts, w, key_dim)."""
    enc = [encode(tokenizer, pre + prompt, subject) for pre in prefixes]
    device = next(layout.model.parameters()).device
    batch = pad_batch([e.ids for e in enc], pad_id(tokenizer), device)
    with record({"k": layout.down(layer)}, inputs=True) as seen:
        layout.model(input_ids=batch.ids)
    forms: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for i, e in enumerate(enc):
        form = e.ids[e.subject_first : e.subject_last + 1]
        w = min(len(form), window)
        forms.setdefault(form, []).append(
            torch.stack([seen["k"][i, e.subject_last - j] for j in range(w)]).float().cpu()
        )
    return {form: torch.stack(ks) for form, ks in forms.items()}


def subject_key_groups(
    layout: ModelLayout,
    tokenizer: Any,
    layer: int,
    prompt: str,
    subject: str,
    prefixes: Sequence[str],
    token: str = "last",
) -> torch.Tensor:
    """(p, key_dim): the subject's keys at layer ``layer`` (see ``read_groups``)."""
    reads = read_groups(
        layout, tokenizer, [(prompt, subject)], prefixes, {"k": (layout.down(layer), True)}, token
    )
    return reads[0]["k"]
