"""Causal tracing (Meng et al., 2022): which hidden states carry a fact from the subject to the answer.

Method: run the prompt clean and record every layer's residual output, MLP output and attention output at
every token. Then corrupt the subject: add Gaussian noise (``noise`` × the embeddings' standard
deviation) to the subject tokens' embeddings, which makes the answer unlikely. Restoring one clean state
at one (layer, token) into the corrupted run and measuring how much of the answer's probability comes
back gives that state's *indirect effect*. States with a large effect at the subject's last token,
especially MLP outputs, are where the fact is stored, and so where ROME edits.

All restorations run in one batch with shared noise samples (common random numbers: every restored state
is compared under the same corruptions, so differences between states are not noise between samples).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from memfed.errors import InvalidArgumentError
from memfed.node.editing.arch import ModelLayout, layout_of
from memfed.node.editing.hooks import patch_output, record
from memfed.node.editing.text import encode, target_ids

Kind = Literal["hidden", "mlp", "attn"]
KINDS: tuple[Kind, ...] = ("hidden", "mlp", "attn")
_MAX_ROWS = 256  # rows per forward pass


@dataclass(frozen=True)
class TraceResult:
    """Indirect effects ``effects[kind][layer][token]`` (probability of the answer restored)."""

    prompt: str
    subject: str
    tokens: tuple[str, ...]
    subject_range: tuple[int, int]  # [first, last] token index of the subject
    answer: str
    answer_token: int
    p_clean: float
    p_corrupt: float
    effects: dict[str, list[list[float]]] = field(repr=False)
    noise: float = 0.0
    samples: int = 0

    @property
    def num_layers(self) -> int:
        return len(self.effects["hidden"])

    def best_layer(self, kind: Kind = "mlp", token: str = "last") -> int:
        """The layer whose ``kind`` state at the subject (its last token, or its strongest token with
        ``token="all"``) has the largest indirect effect, among layers that can still pass it on (not the
        last one, whose output at the subject no later layer reads)."""
        first, last = self.subject_range
        cols = range(first, last + 1) if token == "all" else [last]
        usable = range(max(1, self.num_layers - 1))
        return max(usable, key=lambda layer: max(self.effects[kind][layer][t] for t in cols))

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "subject": self.subject,
            "tokens": list(self.tokens),
            "subject_range": list(self.subject_range),
            "answer": self.answer,
            "p_clean": self.p_clean,
            "p_corrupt": self.p_corrupt,
            "noise": self.noise,
            "samples": self.samples,
            "best_layer": {k: self.best_layer(k, "all") for k in self.effects},
            "effects": self.effects,
        }


def _modules(layout: ModelLayout, kind: Kind) -> list[torch.nn.Module | None]:
    if kind == "hidden":
        return [layout.block(i) for i in range(layout.num_layers)]
    if kind == "mlp":
        return [layout.down(i) for i in range(layout.num_layers)]
    return [layout.module(p) if p else None for p in layout.attention]


@torch.no_grad()
def embedding_std(model: torch.nn.Module) -> float:
    """Standard deviation of the input embedding matrix: the scale the corruption noise is set against."""
    return float(model.get_input_embeddings().weight.float().std())


@torch.no_grad()
def causal_trace(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str,
    subject: str,
    *,
    target: str | None = None,
    noise: float = 3.0,
    samples: int = 8,
    seed: int = 0,
    kinds: Sequence[Kind] = KINDS,
) -> TraceResult:
    """Trace ``prompt``: indirect effect of each (kind, layer, token) on the answer's first token.

    ``target`` is the answer to trace (default: the model's own top next token). ``noise`` is in units
    of the embedding standard deviation (ROME uses 3).
    """
    if samples < 1:
        raise InvalidArgumentError(f"samples must be at least 1, got {samples}")
    layout = layout_of(model)
    device = next(layout.model.parameters()).device
    enc = encode(tokenizer, prompt, subject)
    first = enc.subject_first
    ids = torch.tensor([enc.ids], device=device)
    n_tok = len(enc.ids)
    clean_modules = {f"{k}.{i}": m for k in kinds for i, m in enumerate(_modules(layout, k)) if m is not None}
    with record(clean_modules, inputs=False) as seen:
        logits = layout.model(input_ids=ids).logits[0, -1].float()
    clean = {name: t[0].detach().clone() for name, t in seen.items()}
    probs = torch.softmax(logits, -1)
    answer_tok = target_ids(tokenizer, target)[0] if target is not None else int(probs.argmax())
    answer = target if target is not None else tokenizer.decode([answer_tok]).strip()

    # One batch per chunk of states; rows are (sample s, state j), j = 0 restoring nothing. Every chunk
    # uses the same noise samples.
    states: list[tuple[str, int] | None] = [None]
    for name in clean:
        states.extend((name, t) for t in range(n_tok))
    gen = torch.Generator().manual_seed(seed)
    emb = layout.embeddings()
    n_subj = enc.subject_last - first + 1
    scale = noise * embedding_std(layout.model)
    noise_t = (torch.randn(samples, n_subj, emb.weight.shape[1], generator=gen) * scale).to(device)
    per_chunk = max(1, _MAX_ROWS // samples)
    probs_by_state: list[float] = []
    for c0 in range(0, len(states), per_chunk):
        chunk = states[c0 : c0 + per_chunk]
        p = _run_chunk(layout, ids, chunk, clean, noise_t, (first, enc.subject_last), answer_tok)
        probs_by_state.extend(p.tolist())
    p_corrupt = probs_by_state[0]
    effects: dict[str, list[list[float]]] = {
        k: [[0.0] * n_tok for _ in range(layout.num_layers)] for k in kinds
    }
    for st, p_state in zip(states, probs_by_state, strict=True):
        if st is None:
            continue
        name, t = st
        kind, layer = name.split(".")
        effects[kind][int(layer)][t] = round(p_state - p_corrupt, 5)
    tokens = tuple(tokenizer.decode([i]) for i in enc.ids)
    return TraceResult(
        prompt=prompt,
        subject=subject,
        tokens=tokens,
        subject_range=(first, enc.subject_last),
        answer=answer,
        answer_token=answer_tok,
        p_clean=float(probs[answer_tok]),
        p_corrupt=p_corrupt,
        effects=effects,
        noise=noise,
        samples=samples,
    )


def _run_chunk(
    layout: ModelLayout,
    ids: torch.Tensor,
    states: Sequence[tuple[str, int] | None],
    clean: dict[str, torch.Tensor],
    noise_t: torch.Tensor,
    subject: tuple[int, int],
    answer_tok: int,
) -> torch.Tensor:
    """Mean probability of ``answer_tok`` over the noise samples, per state, in one forward pass."""
    samples, n_states, n_tok = noise_t.shape[0], len(states), ids.shape[1]
    device = ids.device
    first, last = subject
    rows_by_module: dict[str, tuple[list[int], list[int]]] = {}
    for j, st in enumerate(states):
        if st is not None:
            rows, toks = rows_by_module.setdefault(st[0], ([], []))
            rows.extend(s * n_states + j for s in range(samples))
            toks.extend([st[1]] * samples)

    def corrupt(out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        view = out.view(samples, n_states, n_tok, -1)
        view[:, :, first : last + 1] += noise_t.unsqueeze(1).to(out.dtype)
        return out

    with ExitStack() as stack:
        stack.enter_context(patch_output(layout.embeddings(), corrupt))
        for name, (rows, toks) in rows_by_module.items():
            kind, layer = name.split(".")
            module = _modules(layout, kind)[int(layer)]  # type: ignore[arg-type]
            assert module is not None
            r_t, t_t = torch.tensor(rows, device=device), torch.tensor(toks, device=device)

            def restore(
                out: torch.Tensor,
                r_t: torch.Tensor = r_t,
                t_t: torch.Tensor = t_t,
                state: torch.Tensor = clean[name],
            ) -> torch.Tensor:
                out = out.clone()
                out[r_t, t_t] = state[t_t].to(out.dtype)
                return out

            stack.enter_context(patch_output(module, restore))
        logits = layout.model(input_ids=ids.expand(samples * n_states, n_tok)).logits[:, -1].float()
    p = torch.softmax(logits, -1)[:, answer_tok]
    return p.view(samples, n_states).mean(0).cpu()
