"""Lifelong editing with a codebook (GRACE-style): each edit adds (or updates) one codebook entry.

An edit reads the subject's keys at the codebook's layer (the down-projection inputs at the subject's
last ``window`` tokens, averaged over context prefixes, one entry per tokenization of the subject), then
optimizes a value δ at the subject's last token so the new target is produced (``optimize_values``,
with the codebook as it stands already active). The cost is one short optimization, independent of how
many edits came before, and no weight changes.

Conflicts, as GRACE handles them:

- the new subject falls inside an existing entry's radius (the same subject edited again, for another
  relation or a newer answer): the entry is *updated*: its value is re-optimized for all the edits it
  holds, so earlier edits of that subject survive (an earlier edit of the same fact, recognised by its
  prompt or by being the answer this edit replaces, is superseded and dropped from the entry);
- the new key lies closer to another entry than their radii allow: both radii shrink to half the
  distance, so each edit keeps its own region.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from memfed.node.editing.arch import ModelLayout
from memfed.node.editing.codebook import Codebook, CodebookHook, Mode
from memfed.node.editing.keys import corpus_prefixes, window_keys
from memfed.node.editing.stats import default_corpus
from memfed.node.editing.value import DEFAULT_VALUE, EditRequest, ValueConfig, optimize_values

DEFAULT_RADIUS = 0.55
DEFAULT_WINDOW = 3
DEFAULT_CLUSTERS = 3  # entries per tokenization of a subject (centres of its keys under varied contexts)
MERGE_STEPS = 2  # a merged entry's value optimization runs this many times the usual steps
KEY_CONTEXTS = 24  # openings of corpus text a subject's keys are read under
VALUE_CONTEXTS = 4  # of those, how many the value is optimized under (besides the bare prompt)


def kmeans(points: torch.Tensor, k: int, iters: int = 8) -> list[torch.Tensor]:
    """Up to ``k`` centres of ``points`` (n, ...), deterministic: farthest-point start, then Lloyd steps."""
    flat = points.reshape(points.shape[0], -1)
    k = max(1, min(k, flat.shape[0]))
    centres = [flat[0]]
    for _ in range(1, k):
        gap = torch.cdist(flat, torch.stack(centres)).min(1).values
        centres.append(flat[int(gap.argmax())])
    c = torch.stack(centres)
    for _ in range(iters):
        assign = torch.cdist(flat, c).argmin(1)
        c = torch.stack([flat[assign == j].mean(0) if bool((assign == j).any()) else c[j] for j in range(k)])
    return list(c.view(k, *points.shape[1:]))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """Window distance of two keys of one shape: the largest relative distance over the window."""
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-6)).max())


@dataclass(frozen=True)
class CodebookEditResult:
    """What one edit did to the codebook."""

    entries: tuple[int, ...]  # entries written (one per tokenization of the subject)
    merged: bool  # True: an existing subject entry was updated rather than a new one added
    shrunk: tuple[int, ...]  # other entries whose radius was reduced
    value_nll: float
    steps: int


class CodebookEditor:
    """Adds edits to a codebook whose hook is attached to the model (attached here if it is not)."""

    def __init__(
        self,
        layout: ModelLayout,
        tokenizer: Any,
        codebook: Codebook,
        *,
        hook: CodebookHook | None = None,
        radius: float = DEFAULT_RADIUS,
        clusters: int = DEFAULT_CLUSTERS,
        config: ValueConfig = DEFAULT_VALUE,
        key_prefixes: Sequence[str] | None = None,
        value_prefixes: Sequence[str] | None = None,
    ) -> None:
        self.layout, self.tokenizer, self.codebook = layout, tokenizer, codebook
        self.hook = (hook or CodebookHook(layout.model, codebook)).attach()
        self.radius = radius
        self.clusters = clusters
        self.config = config
        if key_prefixes is None:
            key_prefixes = corpus_prefixes(default_corpus(), KEY_CONTEXTS)
        self.key_prefixes = tuple(key_prefixes)
        self.value_prefixes = tuple(
            value_prefixes if value_prefixes is not None else self.key_prefixes[: VALUE_CONTEXTS + 1]
        )

    def _keys(self, request: EditRequest) -> list[torch.Tensor]:
        """The entry keys of an edit: per tokenization of the subject, the centres of up to ``clusters``
        groups of its keys under the key contexts, and the bare prompt's own key."""
        cb = self.codebook
        forms = window_keys(
            self.layout,
            self.tokenizer,
            cb.layer,
            request.prompt,
            request.subject,
            self.key_prefixes,
            cb.window,
        )
        keys: list[torch.Tensor] = []
        for i, variants in enumerate(forms.values()):
            keys.extend(kmeans(variants, self.clusters))
            if i == 0:  # the first prefix is "": its form holds the bare prompt's key first
                own = variants[0]
                if min(_relative(own, k) for k in keys) > self.radius / 2:
                    keys.append(own)
        return keys

    def _padded(self, keys: list[torch.Tensor]) -> torch.Tensor:
        cb = self.codebook
        out = torch.zeros(len(keys), cb.window, cb.keys.shape[2])
        for i, k in enumerate(keys):
            out[i, : k.shape[0]] = k
        return out

    def edit(self, request: EditRequest) -> CodebookEditResult:
        """Write ``request`` into the codebook (see the module docstring for conflicts)."""
        cb = self.codebook
        keys = self._keys(request)
        dist = cb.distances(self._padded(keys))  # (keys, entries)
        inside = (dist <= cb.radii.unsqueeze(0)).any(0).nonzero().flatten().tolist() if cb.size else []
        same = [e for e in inside if self._subject_of(e) == request.subject]
        cb.records.append(request.to_record())
        rec_id = len(cb.records) - 1
        if same:
            return self._merge(request, rec_id, same, keys)
        values = optimize_values(
            self.layout,
            self.tokenizer,
            self.layout.down(cb.layer),
            [request],
            self.value_prefixes,
            self.config,
        )
        radius = self.radius
        shrunk: tuple[int, ...] = ()
        if inside:  # another subject's entry covers these keys (or they cover it): split the space
            near = float(dist[:, inside].min())
            cb.radii[inside] = torch.minimum(cb.radii[inside], torch.tensor(near / 2))
            cb.touch()
            radius, shrunk = min(radius, near / 2), tuple(inside)
        entries = []
        for k in keys:
            value = values.delta[0].cpu()
            if cb.mode == "replace":
                value = self._output(k[0]) + value
            entries.append(cb.add_entry(k, value, radius, [rec_id]))
        return CodebookEditResult(tuple(entries), False, shrunk, float(values.nll[0]), values.steps)

    def _output(self, key: torch.Tensor) -> torch.Tensor:
        """The layer's own output for input ``key`` (what a replace-mode value starts from)."""
        module = self.layout.down(self.codebook.layer)
        param = next(module.parameters())
        with torch.no_grad():
            # forward(), not __call__: the codebook's own hook must not run on this probe
            return module.forward(key.to(param.device, param.dtype).unsqueeze(0))[0].float().cpu()

    def _subject_of(self, entry: int) -> str | None:
        recs = self.codebook.entry_records[entry]
        return self.codebook.records[recs[0]]["subject"] if recs else None

    def _merge(
        self, request: EditRequest, rec_id: int, inside: list[int], keys: list[torch.Tensor]
    ) -> CodebookEditResult:
        """The subject has an entry already: re-optimize its value for all of its edits."""
        cb = self.codebook
        group = sorted(
            {
                e
                for e in range(cb.size)
                if set(cb.entry_records[e]) & {r for i in inside for r in cb.entry_records[i]}
            }
        )
        held = {r for e in group for r in cb.entry_records[e]}
        # An earlier edit this one rewrites (same prompt, or the answer it replaces is that edit's target)
        # is superseded: keeping it would ask one value for two answers to one question.
        superseded = {
            r
            for r in held
            if cb.records[r]["prompt"] == request.prompt or cb.records[r]["target"] == request.old_target
        }
        rec_ids = sorted((held - superseded) | {rec_id})
        requests = [EditRequest.from_record(cb.records[r]) for r in rec_ids]
        # One value must now carry several facts: give the optimization the steps that takes.
        config = replace(self.config, steps=self.config.steps * MERGE_STEPS)
        values = optimize_values(
            self.layout,
            self.tokenizer,
            self.layout.down(cb.layer),
            requests,
            self.value_prefixes,
            config,
            shared=True,
        )
        delta = values.delta[0].cpu()
        for e in group:
            cb.values[e] = cb.values[e] + delta
            cb.entry_records[e] = list(rec_ids)
        # A tokenization of the subject not seen before (e.g. now at the start of a prompt) gets its own
        # entry with the group's value.
        known = self._padded(keys)
        for i, k in enumerate(keys):
            if not bool((cb.distances(known[i : i + 1])[0, group] <= cb.radii[group]).any()):
                value = cb.values[group[0]].clone()
                if cb.mode == "replace":
                    value = self._output(k[0]) + (value - self._output(cb.keys[group[0], 0]))
                group.append(cb.add_entry(k, value, self.radius, rec_ids))
        cb.touch()
        return CodebookEditResult(tuple(group), True, (), float(values.nll.max()), values.steps)


def new_codebook(
    layout: ModelLayout, layer: int, *, window: int = DEFAULT_WINDOW, mode: Mode = "add"
) -> Codebook:
    """An empty codebook at layer ``layer``'s MLP down-projection."""
    layout.check_layer(layer)
    return Codebook.empty(layer, layout.down_proj[layer], layout.key_dim, layout.value_dim, window, mode)
