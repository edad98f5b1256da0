"""``memfed bench watermark``: detection z of the export watermark, its null distribution, and z after
each attack a leaker may apply (issue 11), on a LoRA trained with PEFT on the embedded model.

The same recipe as tests/test_crypto_watermark.py (rank 8 on every linear layer, counterfactual fact
sentences, host-aware mark) and the same attacks (``memfed.crypto.watermark_attacks``), so the figures in
the report are the ones the tests hold to their thresholds; the bench records them instead of asserting.
"""

from __future__ import annotations

import os
import time
from typing import Any

from memfed.bench.harness import BenchResult, one_torch_thread

RANK = 8
N_FACTS = 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT_PREFIX = "base_model.model."


def _fact_ids(tok: Any) -> tuple[Any, Any]:
    """Two groups of N_FACTS counterfactual sentences of one token length (the module's facts, and the
    other module's for the merge attack), so training needs no padding."""
    import torch

    from memfed.node.facts import load_facts

    by_len: dict[int, list[list[int]]] = {}
    for f in load_facts():
        ids = tok(f.sentence(0, target=f.alt_target))["input_ids"]
        by_len.setdefault(len(ids), []).append(ids)
    group = max(by_len.values(), key=len)[: 2 * N_FACTS]
    facts = torch.tensor(group)
    return facts[:N_FACTS], facts[N_FACTS:]


def run(*, quick: bool = False) -> BenchResult:
    """Train two LoRAs, mark one for recipient 0 of 50, and measure z: marked, null, after each attack."""
    with one_torch_thread():
        return _run(quick)


def _run(quick: bool) -> BenchResult:
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    from memfed.crypto.watermark import Z_THRESHOLD, Correlator, host_stats, mark_tensors
    from memfed.crypto.watermark_attacks import ATTACKS, apply_attack
    from memfed.node.models import default_model_dir, load_host_model

    steps = 40 if quick else 120
    null_trials = 200 if quick else 1000
    model_dir = default_model_dir()
    base, tok = load_host_model(model_dir, device="cpu")
    facts, other_facts = _fact_ids(tok)
    cfg = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, lora_dropout=0.0)
    model = get_peft_model(base.float().eval(), cfg)

    def train(data: Any, n: int, lr: float = 5e-3) -> None:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        model.train()
        for _ in range(n):
            loss = model(input_ids=data, labels=data).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()

    def get() -> dict[str, Any]:
        sd = get_peft_model_state_dict(model)
        return {k.removeprefix(PEFT_PREFIX): v.detach().clone().float() for k, v in sd.items()}

    def put(tensors: dict[str, Any]) -> None:
        set_peft_model_state_dict(model, {PEFT_PREFIX + k: v.float() for k, v in tensors.items()})

    t0 = time.perf_counter()
    torch.manual_seed(2)
    train(other_facts, steps)
    other = get()
    for p in model.parameters():  # re-initialize for the module under test
        if p.requires_grad:
            if p.dim() == 2 and p.shape[0] == RANK:
                torch.nn.init.normal_(p, std=0.01)
            else:
                torch.nn.init.zeros_(p)
    train(facts, steps)
    clean = get()
    train_s = time.perf_counter() - t0

    rng = np.random.default_rng(3)
    recipients = [rng.bytes(16).hex() for _ in range(50)]
    secret = os.urandom(32)
    fresh, _ = load_host_model(model_dir, device="cpu")
    stats = host_stats(fresh.float().eval(), clean, scaling=cfg.lora_alpha / RANK)
    t0 = time.perf_counter()
    marked = mark_tensors(clean, secret, recipients[0], stats=stats)
    embed_ms = (time.perf_counter() - t0) * 1e3
    z_marked = Correlator(marked).z(secret, recipients[0])

    corr_m, corr_c = Correlator(marked), Correlator(clean)
    null = [corr_m.z(secret, rng.bytes(16).hex()) for _ in range(null_trials // 2)]
    null += [corr_c.z(rng.bytes(32), recipients[0]) for _ in range(null_trials - null_trials // 2)]
    null_arr = np.asarray(null)

    def retrain(tensors: dict[str, Any]) -> dict[str, Any]:
        put(tensors)
        try:
            torch.manual_seed(6)
            train(torch.cat([facts, other_facts]), 50, lr=2e-3)  # the leaker adapting it to its own use
            return get()
        finally:
            put(clean)

    z_true, z_wrong, named = [], [], []
    for attack in ATTACKS:
        corr = Correlator(apply_attack(attack, marked, other=other, retrain=retrain))
        zs = [corr.z(secret, r) for r in recipients]
        z_true.append(round(zs[0], 3))
        z_wrong.append(round(max(zs[1:]), 3))
        named.append(int(np.argmax(zs)) == 0)

    return BenchResult(
        metrics={
            "z_marked": z_marked,
            "z_threshold": Z_THRESHOLD,
            "null_max_z": float(null_arr.max()),
            "null_mean_z": float(null_arr.mean()),
            "null_std_z": float(null_arr.std()),
            "null_trials": float(len(null)),
            "false_positive_rate": float((null_arr >= Z_THRESHOLD).mean()),
            "z_min_attacked": min(z_true),
            "recipient_named_fraction": sum(named) / len(named),
            "watermark_embed_ms": embed_ms,
            "train_seconds": train_s,
        },
        baseline={
            "null": f"{null_trials // 2} wrong recipients on the marked cube + the rest wrong owner keys on "
            "the unmarked cube",
            "module": f"PEFT LoRA rank {RANK} on {', '.join(TARGETS)}, {steps} steps on {N_FACTS} "
            "counterfactual sentences, host-aware mark",
            "recipients": len(recipients),
            "model": str(model_dir),
        },
        series={"attacks": {"attack": list(ATTACKS), "z": z_true, "best_wrong_z": z_wrong}},
    )
