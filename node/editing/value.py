"""The value half of locate-then-edit: what a module should output at the subject so the new target wins.

For each edit request a vector δ is added to one module's output at the subject's last token (the MLP
down-projection for ROME and the codebook, the block's residual output for MEMIT) and optimized with a
few Adam steps so that

- the new target is produced after the prompt, under every context prefix (so it is not tied to one
  exact wording);
- the next-token distribution after "{subject} is a" stays as it was (KL term: the subject keeps its
  other properties, ROME's "essence" term);
- δ stays small relative to the current output (weight decay, and a hard clamp on its norm).

The result is ``current output + δ``: ROME and MEMIT then fit weights to produce it, the codebook stores it
as the replacement value. All requests are optimized together in one batch (their losses are
independent, so this equals optimizing each alone, at a fraction of the cost).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from memfed.errors import InvalidArgumentError
from memfed.node.editing.arch import ModelLayout
from memfed.node.editing.hooks import output_tensor, patch_output, record
from memfed.node.editing.text import encode, pad_batch, pad_id


def logits_at(
    model: torch.nn.Module, ids: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor
) -> torch.Tensor:
    """Next-token logits at (rows[i], pos[i]) only: the output head runs on those hidden states alone
    (a tenth of the work of a small model's forward is its vocabulary projection at every token)."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(base, torch.nn.Module) or head is None or base is model:
        return model(input_ids=ids).logits[rows, pos]
    hidden = base(input_ids=ids).last_hidden_state
    return head(hidden[rows, pos])


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: after ``prompt`` (which contains ``subject``) the model should say ``target``."""

    prompt: str
    subject: str
    target: str
    old_target: str | None = None  # the answer it replaces, when known (recorded in the cube's origin)
    case_id: str | None = None  # e.g. the CounterFact case or fact id, recorded in the cube's origin

    def to_record(self) -> dict[str, Any]:
        """The JSON form codebooks and edit memories keep per edit (unknown fields left out)."""
        rec: dict[str, Any] = {"prompt": self.prompt, "subject": self.subject, "target": self.target}
        if self.old_target is not None:
            rec["old_target"] = self.old_target
        if self.case_id is not None:
            rec["case_id"] = self.case_id
        return rec

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> EditRequest:
        return cls(rec["prompt"], rec["subject"], rec["target"], rec.get("old_target"), rec.get("case_id"))


@dataclass(frozen=True)
class ValueConfig:
    """Settings of the value optimization (ROME's defaults, scaled to small models)."""

    steps: int = 60  # ROME used 20-25 on GPT-2; at 30 a tenth of the embedded model's edits had not converged
    lr: float = 0.5
    kl_factor: float = 0.0625
    weight_decay: float = 0.02
    clamp_norm: float = 4.0  # |δ| <= clamp_norm * |current output|
    stop_nll: float = 0.03  # stop once every request's target costs less than this (nats per token)
    kl_prompts: tuple[str, ...] = ("{} is a",)


DEFAULT_VALUE = ValueConfig()


@dataclass(frozen=True)
class ValueResult:
    """Per request: the current output at the plain prompt, the optimized δ, and the final target NLL."""

    current: torch.Tensor  # (n, hidden)
    delta: torch.Tensor  # (n, hidden)
    nll: torch.Tensor  # (n,)
    steps: int

    @property
    def target(self) -> torch.Tensor:
        return self.current + self.delta


def optimize_values(
    layout: ModelLayout,
    tokenizer: Any,
    module: torch.nn.Module,
    requests: Sequence[EditRequest],
    prefixes: Sequence[str],
    config: ValueConfig = DEFAULT_VALUE,
    *,
    token: str = "last",
    shared: bool = False,
    groups: Sequence[int] | None = None,
) -> ValueResult:
    """Optimize one δ per request at ``module``'s output at the subject's ``token`` (see module doc):
    ``"last"`` (ROME), ``"first"`` or ``"all"`` subject tokens (one δ shared by them). ``shared``: one
    δ for all requests (several facts of one subject written into one codebook entry); the result then
    has one row. ``groups``: request i uses δ number ``groups[i]`` (0…g−1), for requests that must share
    one (MEMIT: facts of one subject read the same keys, so they can only get one value); the result has
    one row per group, ``nll`` stays per request.

    Each δ stops moving once all its requests cost less than ``config.stop_nll``: pushing a solved
    request further only grows its δ, and a larger δ is a larger weight change that disturbs other
    facts more (a batch would otherwise run every request until the slowest converges)."""
    if not requests:
        raise InvalidArgumentError("no edit requests given")
    if shared:
        groups = [0] * len(requests)
    if groups is not None:
        groups = list(groups)
        if len(groups) != len(requests) or sorted(set(groups)) != list(range(len(set(groups)))):
            raise InvalidArgumentError(
                f"groups must number the {len(requests)} requests' values 0…g−1 without gaps",
                hint="give one group index per request",
            )
    if not prefixes or prefixes[0] != "":
        prefixes = ["", *(p for p in prefixes if p)]
    model = layout.model
    device = next(model.parameters()).device
    rows, req_of_row, nll_rows, kl_rows = [], [], [], []
    for r, req in enumerate(requests):
        for pre in prefixes:
            e = encode(tokenizer, pre + req.prompt, req.subject, req.target)
            nll_rows.append(len(rows))
            rows.append(e)
            req_of_row.append(r)
    for r, req in enumerate(requests):
        for template in config.kl_prompts:
            e = encode(tokenizer, template.format(req.subject), req.subject)
            kl_rows.append(len(rows))
            rows.append(e)
            req_of_row.append(r)
    seqs = [e.ids + e.target[:-1] for e in rows]
    batch = pad_batch(seqs, pad_id(tokenizer), device)
    owner = torch.tensor(req_of_row, device=device)
    n = len(requests)
    p_row, p_pos = [], []
    for i, e in enumerate(rows):
        for pos in e.positions(token):
            p_row.append(i)
            p_pos.append(pos)
    p_row_t = torch.tensor(p_row, device=device)
    p_pos_t = torch.tensor(p_pos, device=device)
    if groups is None:
        n_delta, delta_of = n, torch.arange(n, device=device)
    else:
        n_delta, delta_of = max(groups) + 1, torch.tensor(groups, dtype=torch.long, device=device)
    p_owner = delta_of[owner[p_row_t]]

    # Targets as (row, position, token) triples, and each triple's request for the per-request mean.
    t_row, t_pos, t_tok = [], [], []
    for i in nll_rows:
        e = rows[i]
        for j, tok in enumerate(e.target):
            t_row.append(i)
            t_pos.append(len(e.ids) - 1 + j)
            t_tok.append(tok)
    t_row_t = torch.tensor(t_row, device=device)
    t_pos_t = torch.tensor(t_pos, device=device)
    t_tok_t = torch.tensor(t_tok, device=device)
    t_owner = owner[t_row_t]
    t_count = torch.bincount(t_owner, minlength=n).float()
    kl_row_t = torch.tensor(kl_rows, device=device)
    kl_last = torch.tensor([len(rows[i].ids) - 1 for i in kl_rows], device=device)

    # Logits only where they are read: the targets' and the KL prompts' positions.
    read_row = torch.cat([t_row_t, kl_row_t])
    read_pos = torch.cat([t_pos_t, kl_last])
    n_t = t_row_t.shape[0]
    with torch.no_grad(), record({"m": module}, inputs=False) as seen:
        logits0 = logits_at(model, batch.ids, read_row, read_pos)
        out0 = output_tensor(seen["m"])
        plain = torch.tensor(nll_rows[:: len(prefixes)], device=device)  # prefixes[0] is ""
        plain_pos = torch.tensor([rows[i].subject_last for i in nll_rows[:: len(prefixes)]], device=device)
        current = out0[plain, plain_pos].float()
        kl_init = torch.log_softmax(logits0[n_t:].float(), -1)
    if groups is not None:  # a group's current output: its first request's
        first = [groups.index(g) for g in range(n_delta)]
        current = current[torch.tensor(first, device=device)]
    norms = current.norm(dim=-1).clamp_min(1e-6)
    delta = torch.zeros(n_delta, out0.shape[-1], device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=config.lr)

    def add_delta(out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[p_row_t, p_pos_t] = out[p_row_t, p_pos_t] + delta[p_owner].to(out.dtype)
        return out

    nll = torch.full((n,), float("inf"), device=device)
    steps = 0
    with torch.enable_grad():
        for steps in range(1, config.steps + 1):  # noqa: B007 - steps is reported
            with patch_output(module, add_delta):
                logits = logits_at(model, batch.ids, read_row, read_pos)
            logp = torch.log_softmax(logits.float(), -1)
            tok_nll = -logp[torch.arange(n_t, device=device), t_tok_t]
            # mean over the request's target tokens, across its prefixes
            nll = torch.zeros(n, device=device).index_add(0, t_owner, tok_nll) / t_count
            kl_new = logp[n_t:]
            kl = torch.nn.functional.kl_div(kl_new, kl_init, log_target=True, reduction="none").sum(-1)
            kl_per = torch.zeros(n, device=device).index_add(0, owner[kl_row_t], kl) / max(
                1, len(config.kl_prompts)
            )
            decay = config.weight_decay * (delta.norm(dim=-1) / norms) ** 2
            loss = (nll + config.kl_factor * kl_per).sum() + decay.sum()
            worst = torch.full((n_delta,), -float("inf"), device=device).scatter_reduce(
                0, delta_of, nll.detach(), "amax"
            )
            done = worst < config.stop_nll
            if bool(done.all()):
                break
            opt.zero_grad()
            (grad,) = torch.autograd.grad(loss, [delta])
            delta.grad = grad
            kept = delta.detach()[done].clone()
            opt.step()
            with torch.no_grad():
                delta[done] = kept  # solved values stay where they are (see docstring)
                limit = (config.clamp_norm * norms).unsqueeze(-1)
                scale = (limit / delta.norm(dim=-1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
                delta.mul_(scale)
    return ValueResult(current=current.detach(), delta=delta.detach().clone(), nll=nll.detach(), steps=steps)
