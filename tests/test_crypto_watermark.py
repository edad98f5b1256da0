"""Watermarks on real LoRA modules trained with PEFT on the host model: detection, the null
distribution, robustness to attacks, recipient identification, cost, and the export → import →
detect-watermark path. Figures are printed (run with -s) for the report.

The module under test internalizes 8 counterfactual facts in the embedded model's own format ("The
capital of X is Y." with a new Y); the attacks and the cost are measured on the host-aware mark (what an
export with the base model at hand produces), the model-free fallback is checked for detection and its
cost printed."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from memfed.crypto.watermark import (  # noqa: E402
    Z_THRESHOLD,
    Correlator,
    HostStats,
    host_stats,
    mark_payload,
    mark_tensors,
)
from memfed.crypto.watermark_attacks import ATTACKS, apply_attack  # noqa: E402

RANK = 8
N_FACTS = 8
FACT_LEN = 12  # random-token "facts" of the fallback model only
TRAIN_STEPS = 120
# Every linear layer: on the embedded model (hidden 128) a q/v-only rank-8 LoRA has too little room to
# both hold its facts and carry the mark unnoticed; spread over all layers, the mark is a smaller share
# of each.
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT_PREFIX = "base_model.model."


def _host_model(request: pytest.FixtureRequest) -> tuple[Any, str]:
    """The embedded default model when its fixture exists, else a Llama of the same shape (dev only)."""
    try:
        model_dir = request.getfixturevalue("default_model_dir")
        from memfed.node.models import load_host_model

        model, _ = load_host_model(Path(model_dir))
        return model.float().eval(), f"embedded:{model_dir}"
    except (pytest.FixtureLookupError, ImportError):
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=2048, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
            num_attention_heads=4, max_position_embeddings=256,
        )  # fmt: skip
        return LlamaForCausalLM(
            cfg
        ).eval(), "fallback: random LlamaForCausalLM of the embedded recipe's shape"


@dataclass
class Setup:
    model: Any  # PeftModel with the trained adapter "default"
    facts: torch.Tensor  # (N_FACTS, L) token ids of the sentences the LoRA internalized
    answers: torch.Tensor  # (N_FACTS, L) bool: the answer tokens, whose recall is measured
    other_facts: torch.Tensor  # what the second LoRA learned (and the leaker's own data in train50)
    heldout: torch.Tensor  # prompts the LoRA never saw
    clean: dict[str, torch.Tensor]  # trained LoRA tensors, cube naming (module.lora_X.weight)
    other: dict[str, torch.Tensor]  # a second, independently trained LoRA (for the merge attack)
    secret: bytes
    recipients: list[str]  # 50 candidate recipient ids; index 0 is the true one
    model_name: str
    model_dir: Path | None  # the embedded model's folder (None for the fallback)
    stats: HostStats  # of the base model running the clean LoRA
    marked: dict[str, torch.Tensor]  # host-aware mark for recipients[0]
    marked_free: dict[str, torch.Tensor]  # model-free mark for recipients[0]


def _train(model: Any, data: torch.Tensor, steps: int, lr: float = 5e-3) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=data, labels=data).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _get(model: Any) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(model)
    return {k.removeprefix(PEFT_PREFIX): v.detach().clone().float() for k, v in sd.items()}


def _put(model: Any, tensors: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, {PEFT_PREFIX + k: v.float() for k, v in tensors.items()})


def _heldout_prompts(request: pytest.FixtureRequest, vocab: int, g: torch.Generator) -> torch.Tensor:
    """Held-out prompts in the model's own language: the facts' held-out paraphrase prompts, cut to a
    common length (random ids only for the untrained fallback model, which has no language)."""
    try:
        from memfed.node.facts import load_facts
        from memfed.node.models import load_host_model

        _, tok = load_host_model(Path(request.getfixturevalue("default_model_dir")))
    except (pytest.FixtureLookupError, ImportError):
        return torch.randint(10, vocab, (16, FACT_LEN), generator=g)
    prompts = [p for f in load_facts()[::25] for p in f.prompts("heldout", "statement")]
    ids = [tok(p)["input_ids"] for p in prompts]
    length = min(len(i) for i in ids)
    return torch.tensor([i[:length] for i in ids[:32]])


def _fact_sentences(
    request: pytest.FixtureRequest, vocab: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(facts, answers, other_facts): 2 × N_FACTS counterfactual fact sentences of one token length
    ("The capital of X is Y." with Y = the fact's alt_target), none about the held-out prompts'
    subjects; random ids for the untrained fallback model."""
    try:
        from memfed.node.facts import load_facts
        from memfed.node.models import load_host_model

        _, tok = load_host_model(Path(request.getfixturevalue("default_model_dir")))
    except (pytest.FixtureLookupError, ImportError):
        facts = torch.randint(10, vocab, (N_FACTS, FACT_LEN), generator=g)
        answers = torch.ones_like(facts, dtype=torch.bool)
        answers[:, 0] = False
        return facts, answers, torch.randint(10, vocab, (N_FACTS, FACT_LEN), generator=g)
    by_len: dict[int, list[tuple[list[int], int, int]]] = {}
    for i, f in enumerate(load_facts()):
        if i % 25 == 0:
            continue  # the held-out prompts ask about these subjects
        prompt = f.prompts("train", "statement")[0]
        ids = tok(f.sentence(0, target=f.alt_target))["input_ids"]
        start, end = len(tok(prompt)["input_ids"]), len(tok(f"{prompt} {f.alt_target}")["input_ids"])
        if ids[:start] == tok(prompt)["input_ids"]:
            by_len.setdefault(len(ids), []).append((ids, start, end))
    group = max(by_len.values(), key=len)[: 2 * N_FACTS]
    facts = torch.tensor([ids for ids, _, _ in group])
    answers = torch.zeros_like(facts, dtype=torch.bool)
    for row, (_, start, end) in enumerate(group):
        answers[row, start:end] = True
    return facts[:N_FACTS], answers[:N_FACTS], facts[N_FACTS:]


@pytest.fixture(scope="module")
def setup(request: pytest.FixtureRequest) -> Setup:
    from peft import LoraConfig, get_peft_model

    base, name = _host_model(request)
    g = torch.Generator().manual_seed(1)
    vocab = base.config.vocab_size
    facts, answers, other_facts = _fact_sentences(request, vocab, g)
    heldout = _heldout_prompts(request, vocab, g)
    cfg = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, lora_dropout=0.0)
    model = get_peft_model(base, cfg)
    torch.manual_seed(2)
    _train(model, other_facts, TRAIN_STEPS)
    other = _get(model)
    for p in model.parameters():  # re-initialize for the module under test
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.01) if p.dim() == 2 and p.shape[
                0
            ] == RANK else torch.nn.init.zeros_(p)
    _train(model, facts, TRAIN_STEPS)
    clean = _get(model)
    rng = np.random.default_rng(3)
    recipients = [rng.bytes(16).hex() for _ in range(50)]
    secret = os.urandom(32)
    # The owner's view at export: a fresh copy of the base model, running the LoRA at its scaling.
    fresh, _ = _host_model(request)
    stats = host_stats(fresh, clean, scaling=cfg.lora_alpha / RANK)
    marked = mark_tensors(clean, secret, recipients[0], stats=stats)
    marked_free = mark_tensors(clean, secret, recipients[0])
    model_dir = Path(name.removeprefix("embedded:")) if name.startswith("embedded:") else None
    return Setup(
        model, facts, answers, other_facts, heldout, clean, other, secret, recipients, name, model_dir,
        stats, marked, marked_free,
    )  # fmt: skip


def _z_all(tensors: dict[str, torch.Tensor], s: Setup) -> list[float]:
    c = Correlator(tensors)
    return [c.z(s.secret, r) for r in s.recipients]


def test_marked_cube_detected_and_null_below_threshold(setup: Setup) -> None:
    marked = setup.marked
    z_marked = Correlator(marked).z(setup.secret, setup.recipients[0])
    z_free = Correlator(setup.marked_free).z(setup.secret, setup.recipients[0])
    # Null: 500 wrong recipients on the marked cube + 500 wrong owner keys on the unmarked cube.
    corr_m, corr_c = Correlator(marked), Correlator(setup.clean)
    rng = np.random.default_rng(4)
    null = [corr_m.z(setup.secret, rng.bytes(16).hex()) for _ in range(500)]
    null += [corr_c.z(rng.bytes(32), setup.recipients[0]) for _ in range(500)]
    null_arr = np.asarray(null)
    fpr = float((null_arr >= Z_THRESHOLD).mean())
    print(
        f"\n[watermark] model={setup.model_name} z_marked={z_marked:.2f} (model-free {z_free:.2f}) "
        f"stats_tokens={setup.stats.tokens} null: n={len(null)} "
        f"mean={null_arr.mean():.3f} std={null_arr.std():.3f} max={null_arr.max():.2f} "
        f"threshold={Z_THRESHOLD} empirical_FPR={fpr:.4f}"
    )
    assert z_marked >= 6.0 and z_free >= 6.0
    assert null_arr.max() < Z_THRESHOLD
    # Payload round trip: marking through safetensors bytes gives the same mark.
    from memfed.cube.payload import decode_tensors, encode_tensors

    payload = encode_tensors(setup.clean)
    via_payload = decode_tensors(mark_payload(payload, setup.secret, setup.recipients[0], stats=setup.stats))
    assert Correlator(via_payload).z(setup.secret, setup.recipients[0]) == pytest.approx(z_marked, abs=1e-3)


def _attack(name: str, marked: dict[str, torch.Tensor], s: Setup) -> dict[str, torch.Tensor]:
    def retrain(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        _put(s.model, tensors)
        try:
            torch.manual_seed(6)
            # 50 further steps on other data (the leaker adapting the module to its own use).
            _train(s.model, torch.cat([s.facts, s.other_facts]), 50, lr=2e-3)
            return _get(s.model)
        finally:
            _put(s.model, s.clean)

    return apply_attack(name, marked, other=s.other, retrain=retrain)


@pytest.mark.parametrize("kind", ["host-aware", "model-free"])
@pytest.mark.parametrize("attack", ATTACKS)
def test_mark_survives_attack_and_names_recipient(setup: Setup, attack: str, kind: str) -> None:
    attacked = _attack(attack, setup.marked if kind == "host-aware" else setup.marked_free, setup)
    zs = _z_all(attacked, setup)
    best = int(np.argmax(zs))
    others = sorted(zs[1:])[-1]
    print(f"\n[watermark] mark={kind} attack={attack} z_true={zs[0]:.2f} best_wrong_of_49={others:.2f}")
    assert best == 0, "the true recipient is not the most likely among 50"
    assert zs[0] >= Z_THRESHOLD


def _logits(model: Any, tensors: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    _put(model, tensors)
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _recall(logits: torch.Tensor, ids: torch.Tensor, answers: torch.Tensor) -> float:
    """Teacher-forced argmax accuracy on the answer tokens."""
    hit = logits[:, :-1].argmax(-1) == ids[:, 1:]
    return float(hit[answers[:, 1:]].float().mean())


def _kl(
    model: Any, clean: dict[str, torch.Tensor], marked: dict[str, torch.Tensor], ids: torch.Tensor
) -> float:
    p = torch.log_softmax(_logits(model, clean, ids), -1)
    q = torch.log_softmax(_logits(model, marked, ids), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_mark_costs_nothing_measurable(setup: Setup) -> None:
    s = setup
    try:
        kl = _kl(s.model, s.clean, s.marked, s.heldout)
        kl_free = _kl(s.model, s.clean, s.marked_free, s.heldout)
        recall_clean = _recall(_logits(s.model, s.clean, s.facts), s.facts, s.answers)
        recall_marked = _recall(_logits(s.model, s.marked, s.facts), s.facts, s.answers)
    finally:
        _put(s.model, s.clean)
    print(
        f"\n[watermark] KL(clean||marked) heldout={kl:.2e} (model-free mark: {kl_free:.2e}) "
        f"answer recall {recall_clean:.3f} -> {recall_marked:.3f}"
    )
    assert kl <= 1e-3
    assert recall_clean >= 0.9, "the LoRA did not internalize its facts (test setup)"
    assert recall_marked >= recall_clean


def test_mark_cost_on_a_random_token_lora(setup: Setup, request: pytest.FixtureRequest) -> None:
    """The harder case the issue was measured on: a LoRA that memorized random token sequences moves
    the model much further from its base (model-free mark: KL ≈ 5e-3 here); the host-aware mark must
    still cost ≤ 1e-3 on the held-out prompts."""
    s = setup
    g = torch.Generator().manual_seed(8)
    data = torch.randint(10, s.model.config.vocab_size, (N_FACTS, FACT_LEN), generator=g)
    try:
        for p in s.model.parameters():  # a fresh adapter, as in the setup
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.01) if p.dim() == 2 and p.shape[
                    0
                ] == RANK else torch.nn.init.zeros_(p)
        torch.manual_seed(9)
        _train(s.model, data, TRAIN_STEPS)
        lora = _get(s.model)
        fresh, _ = _host_model(request)
        stats = host_stats(fresh, lora, scaling=2.0)  # lora_alpha / r of the setup's LoraConfig
        marked = mark_tensors(lora, s.secret, s.recipients[0], stats=stats)
        marked_free = mark_tensors(lora, s.secret, s.recipients[0])
        kl, kl_free = (_kl(s.model, lora, m, s.heldout) for m in (marked, marked_free))
        recall_clean = _recall(_logits(s.model, lora, data), data, torch.ones_like(data, dtype=torch.bool))
        recall_marked = _recall(_logits(s.model, marked, data), data, torch.ones_like(data, dtype=torch.bool))
    finally:
        _put(s.model, s.clean)
    z = Correlator(marked).z(s.secret, s.recipients[0])
    print(
        f"\n[watermark] random-token LoRA: z={z:.2f} KL heldout={kl:.2e} (model-free mark: {kl_free:.2e}) "
        f"recall {recall_clean:.3f} -> {recall_marked:.3f}"
    )
    assert z >= 6.0
    assert kl <= 1e-3
    assert recall_marked >= recall_clean


def test_export_import_detect_cli(
    setup: Setup, request: pytest.FixtureRequest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Owner exports a LoRA cube to carol (model-free mark: no base model given) and to bob (host-aware:
    through the CLI with --model); bob imports it; the leaked payload names bob."""
    from memfed.cli.main import main
    from memfed.crypto.exchange import export_cube
    from memfed.crypto.identity import PUBLIC_FILE, init_identity
    from memfed.crypto.seal import open_file
    from memfed.crypto.signing import TrustedKeys
    from memfed.cube.fingerprint import fingerprint_model
    from memfed.cube.peft_io import import_peft
    from memfed.node.store import CubeStore

    s = setup
    _put(s.model, s.clean)
    adapter_dir = tmp_path / "facts_lora"
    s.model.save_pretrained(adapter_dir)
    host = s.model.get_base_model()
    cube = import_peft(adapter_dir, host, cube_id="facts_lora", version="1.0.0")
    alice, bob, carol = (init_identity(tmp_path / n) for n in ("alice", "bob", "carol"))
    bob_file = tmp_path / f"{bob.public.fingerprint}.mcube"
    with CubeStore(tmp_path / "sa") as sa:
        sa.put(cube.manifest, cube.payload)
        res = export_cube(sa, "facts_lora", None, alice, [carol.public], tmp_path / "carol.mcube")
        assert res.watermarked and not res.host_aware and res.seal.manifest.digest != cube.manifest.digest
        if s.model_dir is None:  # fallback model: no folder for --model, the Python API instead
            fresh, _ = _host_model(request)
            res = export_cube(sa, "facts_lora", None, alice, [bob.public], bob_file, host=lambda fp: fresh)
            assert res.host_aware
    if s.model_dir is not None:
        args = [
            "cube",
            "export",
            "facts_lora",
            "--to",
            str(tmp_path / "bob" / PUBLIC_FILE),
            "-o",
            str(bob_file),
        ]
        args += [
            "--dir",
            str(tmp_path / "alice"),
            "--store",
            str(tmp_path / "sa"),
            "--model",
            str(s.model_dir),
        ]
        capsys.readouterr()
        assert main([*args, "--json"]) == 0
        exported = json.loads(capsys.readouterr().out)
        assert exported["watermarked"] and exported["mark"] == "host-aware"
    fp = fingerprint_model(host)
    with CubeStore(tmp_path / "sb") as sb:
        m = open_file(bob_file, sb, bob, TrustedKeys([alice.public]), host_fingerprint=fp)
        leaked = sb.payload_path(m.digest)
    capsys.readouterr()
    assert main(["cube", "detect-watermark", str(leaked), "--owner", str(tmp_path / "alice"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["detected"] and report["most_likely_recipient"] == [bob.public.fingerprint]
    assert report["z"] >= 6.0
    # The unmarked original names nobody.
    clean_file = tmp_path / "clean.safetensors"
    clean_file.write_bytes(cube.payload)
    assert (
        main(["cube", "detect-watermark", str(clean_file), "--owner", str(tmp_path / "alice"), "--json"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["detected"] is False
