"""Train a parameter translator (``translator.py``) on the node's own documents, end to end.

Why end to end rather than regressing onto trained LoRAs' factors: LoRA factors are defined only up to
an invertible r×r mix (A → MA, B → BM⁻¹), so matching them weight by weight is ill posed. What a trained
LoRA *does* is lower the LM loss of the document's augmentation items; the translator gets exactly that
objective, with its generated LoRA applied through a functional hook (θ gets gradients through the
frozen base model), over many synthetic documents of fresh facts (``synth.synthetic_document``).
The model's own answers to other prompts are trained under each generated LoRA too (replay), so θ
learns values that leave what the model knew alone.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from memfed.cube.fingerprint import DEFAULT_SAMPLE_SEED
from memfed.errors import InvalidArgumentError
from memfed.mip.v1 import cube_pb2
from memfed.node.conversion.augment import augment
from memfed.node.conversion.documents import Document
from memfed.node.conversion.replay import replay_items, world_prompts
from memfed.node.conversion.synth import synthetic_document
from memfed.node.conversion.train import encode_items, lm_loss, pad_items
from memfed.node.conversion.translator import (
    FactEncoding,
    TranslatorConfig,
    TranslatorNet,
    document_facts,
    encode_facts,
    feature_dim,
    inverse_moments,
    key_factors,
)
from memfed.node.editing.arch import ModelLayout, layout_of
from memfed.node.editing.stats import second_moments
from memfed.node.runtime import ModuleRuntime

Progress = Callable[[int, int], None]
TRAIN_SEED_BASE = 1_000_000  # synthetic training documents use seeds from here: benches use small seeds


@dataclass
class Translator:
    """A trained translator bound to one base model: θ, its config and the C⁻¹ it generates with."""

    net: TranslatorNet
    config: TranslatorConfig
    c_inv: dict[int, torch.Tensor]
    layout: ModelLayout
    fingerprint: cube_pb2.BaseModelFingerprint
    info: dict[str, str] = field(default_factory=dict)  # how it was trained (steps, seconds, loss, docs)


@dataclass
class _Doc:
    encoding: FactEncoding
    a: dict[int, torch.Tensor]  # layer → (n, key_dim), fixed
    items: list[tuple[list[int], int]]


def training_documents(tokenizer: Any, config: TranslatorConfig) -> list[Document]:
    """Synthetic documents of fresh facts, seeded away from the seeds benches and tests evaluate on."""
    return [
        synthetic_document(config.doc_tokens, tokenizer, seed=TRAIN_SEED_BASE + config.seed * 10_000 + i)
        for i in range(config.train_documents)
    ]


@contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[None]:
    """The base model's weights take no gradient for the block (θ alone learns); restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def generated_lora(
    layout: ModelLayout, deltas: dict[int, tuple[torch.Tensor, torch.Tensor]]
) -> Iterator[None]:
    """Per-row LoRAs on down-projections for the block: out += (x Aᵀ) Bᵀ with A (b, r, in), B (b, out, r).

    Functional (hooks, gradients flow into B): what the runtime will do with the generated cube.
    """
    handles = []
    for layer, (a, b) in deltas.items():

        def hook(mod: torch.nn.Module, args: tuple[Any, ...], out: torch.Tensor, a=a, b=b) -> torch.Tensor:
            x = args[0]
            return out + torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))

        handles.append(layout.down(layer).register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def train_translator(
    model: torch.nn.Module,
    tokenizer: Any,
    config: TranslatorConfig | None = None,
    *,
    documents: Sequence[Document] | None = None,
    fingerprint: cube_pb2.BaseModelFingerprint | None = None,
    progress: Progress | None = None,
) -> Translator:
    """Train θ for ``model`` on ``documents`` (default: ``config.train_documents`` synthetic ones)."""
    config = config or TranslatorConfig()
    layout = layout_of(model)
    config.check(layout.num_layers)
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    if fingerprint is None:
        from memfed.cube.fingerprint import fingerprint_model

        fingerprint = fingerprint_model(model, seed=DEFAULT_SAMPLE_SEED)
    moments = second_moments(model, tokenizer, fingerprint_id=fingerprint.fingerprint_id)
    c_inv = inverse_moments(moments, config.layers, config.ridge)
    docs = list(documents) if documents is not None else training_documents(tokenizer, config)
    prepared: list[_Doc] = []
    for doc in docs:
        facts = document_facts([doc])
        if not facts:
            continue
        enc = encode_facts(layout, tokenizer, facts, config)
        prepared.append(_Doc(enc, key_factors(enc.keys, c_inv), encode_items(tokenizer, augment([doc]))))
    if not prepared:
        raise InvalidArgumentError("no training document states a fact the translator can learn from")
    subjects = {f.subject for d in prepared for f in d.encoding.facts}
    replay_prompts, _ = world_prompts(config.replay_prompts, 0, exclude_subjects=subjects, seed=config.seed)
    rt = ModuleRuntime(model)
    try:
        replay = (
            encode_items(tokenizer, replay_items(rt, tokenizer, replay_prompts))
            if config.replay_per_doc
            else []
        )
    finally:
        rt.close()
    prep_seconds = time.perf_counter() - t0

    torch.manual_seed(config.seed)
    net = TranslatorNet(
        feature_dim(layout.value_dim), layout.value_dim, len(config.layers), config.hidden
    ).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=1e-4)
    rng = random.Random(config.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    loss_value = float("nan")
    t1 = time.perf_counter()
    with _frozen(model):
        for step in range(config.steps):
            chosen = rng.sample(prepared, min(config.docs_per_step, len(prepared)))
            rows: list[tuple[list[int], int]] = []
            row_doc: list[int] = []
            for j, d in enumerate(chosen):
                picked = rng.sample(d.items, min(config.items_per_doc, len(d.items)))
                if replay:
                    picked += rng.sample(replay, min(config.replay_per_doc, len(replay)))
                rows += picked
                row_doc += [j] * len(picked)
            rank = max(len(d.encoding.facts) for d in chosen)
            values = net(torch.cat([d.encoding.features for d in chosen]).to(device))  # (n, L, out)
            deltas = {}
            for li, layer in enumerate(config.layers):
                a = torch.zeros(len(chosen), rank, layout.key_dim, device=device)
                b = torch.zeros(len(chosen), layout.value_dim, rank, device=device)
                start = 0
                for j, d in enumerate(chosen):
                    n = len(d.encoding.facts)
                    a[j, :n] = d.a[layer].to(device)
                    b[j, :, :n] = values[start : start + n, li].T
                    start += n
                index = torch.tensor(row_doc, device=device)
                deltas[layer] = (a.index_select(0, index), b.index_select(0, index))
            ids, mask = pad_items(rows, pad, device)
            with generated_lora(layout, deltas):
                loss = lm_loss(model, ids, mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_value = float(loss.detach())
            if progress is not None:
                progress(step + 1, config.steps)
    model.train(was_training)
    net.eval()
    info = {
        "steps": str(config.steps),
        "documents": str(len(prepared)),
        "facts": str(sum(len(d.encoding.facts) for d in prepared)),
        "final_loss": f"{loss_value:.4f}",
        "prepare_seconds": f"{prep_seconds:.2f}",
        "train_seconds": f"{time.perf_counter() - t1:.2f}",
    }
    return Translator(net, config, c_inv, layout, fingerprint, info)
