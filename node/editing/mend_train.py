"""Train a MEND editor (``mend.py``) on the model's own edit cases: the train split of the fact file.

Why this objective: what an edit must do is make the new target win after the prompt *and after other
phrasings of it*, while other subjects keep their answers. So per training edit the update g produces is
applied (through a per-row hook, gradients flowing into g) and g is trained on

- the new target's NLL on the edit prompt and its paraphrases (the paraphrase term buys generalization:
  the value must work wherever the subject's key fires, not on one wording);
- a hinge on the gap between the new and the true answer's log-probability there (``MendConfig.margin``):
  efficacy is that comparison, and NLL alone spends its gradient on edits already won while unseen
  subjects' edits fell just short (efficacy 0.82 without it, ~0.90 with it, on the test split);
- the KL between the unedited and the edited next-token distributions on the answers of *other* training
  subjects' prompts: some of subjects that share a word piece with the edited one, half of the rest of
  the same relation (the prompts an edit most easily spills into).

The locality prompts come from the training cases only (never a case's neighbourhood list, which names
subjects that may be in the test split), so the test subjects stay unseen in every role. The inputs g
reads, the (u, δ) pairs, depend only on the unedited model: they are computed once, before training, so a
training step costs one forward/backward of the edited model.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from memfed.cube.fingerprint import DEFAULT_SAMPLE_SEED
from memfed.errors import InvalidArgumentError
from memfed.mip.v1 import cube_pb2
from memfed.node.conversion.translator import inverse_moments
from memfed.node.conversion.translator_train import generated_lora
from memfed.node.editing.arch import layout_of
from memfed.node.editing.counterfact import EditCase
from memfed.node.editing.keys import context_prefixes
from memfed.node.editing.mend import EditPairs, MendConfig, MendEditor, MendNet, edit_pairs
from memfed.node.editing.text import Encoded, encode, pad_batch, pad_id
from memfed.node.editing.value import logits_at

Progress = Callable[[int, int], None]
_CHUNK = 32  # requests per forward/backward when reading the training pairs


@dataclass
class _Case:
    relation: str
    subject: str
    pairs: EditPairs
    edit_rows: list[Encoded]  # prompt and paraphrases, each with the new target
    true_rows: list[Encoded]  # the same prompts with the true answer


@dataclass
class _Probe:
    relation: str
    subject: str
    enc: Encoded  # an unrelated prompt with the unedited model's answer
    base: torch.Tensor  # (answer tokens, vocab): the unedited model's log-probabilities there


@torch.no_grad()
def _probes(model: torch.nn.Module, tokenizer: Any, cases: Sequence[EditCase]) -> list[_Probe]:
    """Every training prompt (rewrite and paraphrases) with its true answer, and the unedited model's
    log-probabilities over that answer (what the KL keeps)."""
    items = [
        (c.relation, c.subject, encode(tokenizer, p, None, c.target_true))
        for c in cases
        if c.target_true
        for p in (c.prompt, *c.paraphrases)
    ]
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(items), 128):
        chunk = items[start : start + 128]
        batch = pad_batch([e.ids + e.target[:-1] for _, _, e in chunk], pad_id(tokenizer), device)
        rows = torch.tensor([i for i, (_, _, e) in enumerate(chunk) for _ in e.target], device=device)
        pos = torch.tensor(
            [len(e.ids) - 1 + j for _, _, e in chunk for j in range(len(e.target))], device=device
        )
        logp = torch.log_softmax(logits_at(model, batch.ids, rows, pos).float(), -1).cpu()
        at = 0
        for rel, subject, e in chunk:
            out.append(_Probe(rel, subject, e, logp[at : at + len(e.target)]))
            at += len(e.target)
    return out


def _pick_probes(
    rng: random.Random, case: _Case, index: _ProbeIndex, n: int, near_share: float
) -> list[_Probe]:
    """``n`` probes of other subjects: a ``near_share`` of them of subjects sharing a word piece with the
    case's, half of the rest of the case's relation, the others of any."""
    near = [p for p in index.near.get(case.subject, ()) if p.subject != case.subject]
    picked = rng.sample(near, min(len(near), round(near_share * n)))
    same = [p for p in index.by_rel.get(case.relation, ()) if p.subject != case.subject]
    picked += rng.sample(same, min(len(same), (n - len(picked) + 1) // 2))
    while len(picked) < n:
        p = rng.choice(index.pool)
        if p.subject != case.subject:
            picked.append(p)
    return picked


@dataclass
class _ProbeIndex:
    """The locality probes, all and by relation, and per edited subject those of other subjects that
    share a word piece with it: at the first layers a key is mostly its token, so those are the prompts
    an edit's value spills into (a shared " River" carries it to every river)."""

    pool: list[_Probe]
    by_rel: dict[str, list[_Probe]]
    near: dict[str, list[_Probe]]


def _probe_index(tokenizer: Any, pool: list[_Probe], subjects: Iterable[str]) -> _ProbeIndex:
    def pieces(subject: str) -> set[int]:
        return {*tokenizer(subject)["input_ids"], *tokenizer(" " + subject)["input_ids"]} - set(
            tokenizer.all_special_ids
        )

    by_rel: dict[str, list[_Probe]] = {}
    for probe in pool:
        by_rel.setdefault(probe.relation, []).append(probe)
    of_subject = {p.subject: pieces(p.subject) for p in pool}
    near = {}
    for subject in set(subjects):
        mine = pieces(subject)
        near[subject] = [p for p in pool if p.subject != subject and of_subject[p.subject] & mine]
    return _ProbeIndex(pool, by_rel, near)


def _training_edits(cases: Sequence[EditCase], extra: int, rng: random.Random) -> list[tuple[EditCase, str]]:
    """(case, new target) pairs: each case's own new target, and ``extra`` more drawn from the answers of
    the other training cases of its relation (CounterFact's rule for a new target: an answer the model
    gives for other subjects). With 287 cases the editor would otherwise see each subject with one target
    and learn that pairing rather than how a gradient becomes a value."""
    answers: dict[str, set[str]] = {}
    for c in cases:
        answers.setdefault(c.relation, set()).update(t for t in (c.target_true, c.target_new) if t)
    out = []
    for c in cases:
        out.append((c, c.target_new))
        others = sorted(answers[c.relation] - {c.target_true, c.target_new})
        out += [(c, t) for t in rng.sample(others, min(extra, len(others)))]
    return out


def train_mend(
    model: torch.nn.Module,
    tokenizer: Any,
    cases: Sequence[EditCase],
    config: MendConfig,
    second_moments: dict[int, torch.Tensor],
    *,
    fingerprint: cube_pb2.BaseModelFingerprint | None = None,
    progress: Progress | None = None,
) -> MendEditor:
    """Train g for ``model`` on ``cases`` (a train split). ``config.layers`` must be resolved (non-empty);
    ``second_moments`` are the model's key statistics (``Editor.second_moments``)."""
    layout = layout_of(model)
    config.check(layout.num_layers)
    if not config.layers:
        raise InvalidArgumentError("no layers to edit", hint="give layers (Editor.choose_layer picks one)")
    cases = [c for c in cases if c.target_true]
    if len(cases) < 2:
        raise InvalidArgumentError(
            f"{len(cases)} usable training cases: the editor needs at least 2 with a known true answer",
            hint="train on the fact file's train split (counterfact.split_cases)",
        )
    if fingerprint is None:
        from memfed.cube.fingerprint import fingerprint_model

        fingerprint = fingerprint_model(model, seed=DEFAULT_SAMPLE_SEED)
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    prefixes = context_prefixes(model, tokenizer)
    edits = _training_edits(cases, config.extra_targets, random.Random(config.seed))
    pairs: list[EditPairs] = []
    for start in range(0, len(edits), _CHUNK):
        chunk = [replace(c.request(), target=t) for c, t in edits[start : start + _CHUNK]]
        pairs += edit_pairs(layout, tokenizer, chunk, config.layers, prefixes, config.token)
    prepared = [
        _Case(
            c.relation,
            c.subject,
            p,
            [encode(tokenizer, q, None, t) for q in (c.prompt, *c.paraphrases)],
            [encode(tokenizer, q, None, c.target_true) for q in (c.prompt, *c.paraphrases)],
        )
        for (c, t), p in zip(edits, pairs, strict=True)
    ]
    index = _probe_index(tokenizer, _probes(model, tokenizer, cases), (c.subject for c, _ in edits))
    c_inv = inverse_moments(second_moments, config.layers, config.ridge)
    torch.manual_seed(config.seed)
    nets = {
        layer: MendNet(layout.key_dim, layout.value_dim, config.rank, config.key_side, config.init_lr)
        for layer in config.layers
    }
    for layer, net in nets.items():
        keys = torch.cat([p.keys[layer] for p in pairs])
        with torch.no_grad():
            out_norm = float(layout.down(layer)(keys.to(device)).norm(dim=-1).median())
        net.set_statistics(keys, torch.cat([p.grads[layer] for p in pairs]), out_norm)
        net.to(device)
    editor = MendEditor(nets, config, c_inv, layout, tokenizer, fingerprint)
    params = [p for net in nets.values() for p in net.parameters()]
    steps = [net.log_lr for net in nets.values()]
    # η lives on a log scale and must move by a factor of several: it learns ten times faster than g.
    opt = torch.optim.Adam(
        [
            {"params": [p for p in params if all(p is not s for s in steps)]},
            {"params": steps, "lr": 10 * config.lr},
        ],
        lr=config.lr,
    )
    rng = random.Random(config.seed)
    prep_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    loss_value = edit_value = kl_value = first_edit = float("nan")
    for step in range(config.steps):
        chosen = rng.sample(prepared, min(config.batch, len(prepared)))
        loss, edit_loss, kl = _step_loss(editor, chosen, index, rng, device)
        opt.zero_grad(set_to_none=True)
        grads = torch.autograd.grad(loss, params)  # g's parameters only: the model's weights take none
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()
        loss_value, edit_value, kl_value = float(loss.detach()), float(edit_loss), float(kl)
        if step == 0:
            first_edit = edit_value
        if progress is not None:
            progress(step + 1, config.steps)
    model.train(was_training)
    for net in nets.values():
        net.eval()
    editor.info = {
        "steps": str(config.steps),
        "cases": str(len(cases)),
        "training_edits": str(len(edits)),
        "layers": ",".join(map(str, config.layers)),
        "first_edit_nll": f"{first_edit:.4f}",
        "final_loss": f"{loss_value:.4f}",
        "final_edit_nll": f"{edit_value:.4f}",
        "final_locality_kl": f"{kl_value:.5f}",
        "prepare_seconds": f"{prep_seconds:.2f}",
        "train_seconds": f"{time.perf_counter() - t1:.2f}",
    }
    return editor


def _step_loss(
    editor: MendEditor,
    chosen: Sequence[_Case],
    index: _ProbeIndex,
    rng: random.Random,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Edit NLL + weighted locality KL of one batch of training edits, each under its own update."""
    config, layout, tokenizer = editor.config, editor.layout, editor.tokenizer
    seqs: list[tuple[int, ...]] = []
    owner: list[int] = []
    e_row, e_pos, e_tok, e_w, e_seq = [], [], [], [], []  # target tokens: new (then true) answers
    shares: list[float] = []  # per scored answer sequence: its share of its edit's loss
    pairs: list[tuple[int, int]] = []  # (new, true) answer sequences compared by the margin term
    k_row, k_pos, k_base = [], [], []
    for j, case in enumerate(chosen):
        n_para = len(case.edit_rows) - 1
        with_true = config.margin > 0 and bool(case.true_rows)
        for r, enc in enumerate(case.edit_rows):  # row 0: the edit prompt, then its paraphrases
            share = config.prompt_weight if r == 0 else (1.0 - config.prompt_weight) / n_para
            if n_para == 0:
                share = 1.0
            for e, is_new in ((enc, True), *(((case.true_rows[r], False),) if with_true else ())):
                if not is_new:
                    pairs.append((len(shares) - 1, len(shares)))
                for t, tok in enumerate(e.target):
                    e_row.append(len(seqs))
                    e_pos.append(len(e.ids) - 1 + t)
                    e_tok.append(tok)
                    e_w.append(1.0 / len(e.target))
                    e_seq.append(len(shares))
                shares.append(share / len(chosen) if is_new else 0.0)
                seqs.append(e.ids + e.target[:-1])
                owner.append(j)
        for probe in _pick_probes(rng, case, index, config.locality_prompts, config.near_probes):
            e = probe.enc
            k_row += [len(seqs)] * len(e.target)
            k_pos += [len(e.ids) - 1 + t for t in range(len(e.target))]
            k_base.append(probe.base)
            seqs.append(e.ids + e.target[:-1])
            owner.append(j)
    # Edits of one group are made together (their updates summed, as a batch edit is) and every row of
    # the group's edits is scored under that sum, so g learns values whose leaks do not add up.
    factors = [editor.factors(c.pairs) for c in chosen]
    groups = [list(range(g, min(g + config.group, len(chosen)))) for g in range(0, len(chosen), config.group)]
    group_of = torch.tensor([j // config.group for j in owner], device=device)
    deltas = {}
    for layer in config.layers:
        merged = [
            (torch.cat([factors[j][layer][0] for j in g]), torch.cat([factors[j][layer][1] for j in g], 1))
            for g in groups
        ]
        rank = max(fa.shape[0] for fa, _ in merged)
        a = torch.zeros(len(groups), rank, layout.key_dim, device=device)
        b = torch.zeros(len(groups), layout.value_dim, rank, device=device)
        for j, (fa, fb) in enumerate(merged):
            a[j, : fa.shape[0]] = fa
            b[j, :, : fb.shape[1]] = fb
        deltas[layer] = (a.index_select(0, group_of), b.index_select(0, group_of))
    batch = pad_batch(seqs, pad_id(tokenizer), device)
    rows = torch.tensor(e_row + k_row, device=device)
    pos = torch.tensor(e_pos + k_pos, device=device)
    with generated_lora(layout, deltas):
        logp = torch.log_softmax(logits_at(layout.model, batch.ids, rows, pos).float(), -1)
    n_e = len(e_row)
    tok = torch.tensor(e_tok, device=device)
    tok_lp = logp[torch.arange(n_e, device=device), tok] * torch.tensor(e_w, device=device)
    # Mean log-probability per token of every scored answer (CounterFact compares answers so).
    seq_lp = torch.zeros(len(shares), device=device).index_add(0, torch.tensor(e_seq, device=device), tok_lp)
    share_t = torch.tensor(shares, device=device)
    edit_loss = -(seq_lp * share_t).sum()
    loss = edit_loss
    if pairs:
        # Efficacy asks the new answer to beat the true one: a hinge (softplus) on their gap, so the
        # edits that do not yet win get the gradient, not the ones already far ahead.
        new_i, true_i = (torch.tensor(x, device=device) for x in zip(*pairs, strict=True))
        gap = seq_lp[new_i] - seq_lp[true_i]
        hinge = torch.nn.functional.softplus(config.margin_gap - gap)
        loss = loss + config.margin * (hinge * share_t[new_i]).sum()
    if k_row:
        base = torch.cat(k_base).to(device)
        kl = torch.nn.functional.kl_div(logp[n_e:], base, log_target=True, reduction="batchmean")
    else:
        kl = torch.zeros((), device=device)
    return loss + config.locality_weight * kl, edit_loss.detach(), kl.detach()
