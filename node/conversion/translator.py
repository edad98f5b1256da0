"""A parameter translator: a document's facts → LoRA factors in one forward pass (DyPRAG-style).

Why: training a LoRA per document costs CPU minutes (``internalize``). A small network that has learned,
on many documents, how a fact should be written into the weights can produce a module in milliseconds.

How, per fact (subject, relation, target) of the documents, in one batched pass of the bare model:

* the **key** k: the MLP down-projection's input at the subject's last token (as ROME), averaged over
  the fact's own sentence and the relation's trained phrasings (what the module will see when asked);
* the **features** x: the target's token embeddings (first ``TARGET_TOKENS`` positions) and the residual
  stream at ``feature_layer`` just before the target and over it (what the sentence says about it);
* the **value** v = θ(x): a small MLP, one output head per edited layer.

The generated LoRA has one rank per fact and layer: A_i = (C⁻¹k_i)ᵀ / (k_iᵀC⁻¹k_i), B_i = v_i, so
ΔW·k_i = v_i while keys the model ordinarily uses (second moments C, from ``node/editing/stats``) are
disturbed little. That is a plain LoRA cube the node runtime runs like any other module.

θ is trained end to end (``translator_train``) with the LM loss of the documents' augmentation items
under the generated LoRA; the regularized C⁻¹ it was trained with is stored with it (``translator_cube``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from memfed.errors import InvalidArgumentError
from memfed.node.conversion.augment import all_facts
from memfed.node.conversion.documents import DocFact, Document
from memfed.node.editing.arch import ModelLayout
from memfed.node.editing.hooks import record
from memfed.node.editing.text import pad_batch, pad_id, subject_span
from memfed.node.facts import load_relations, question_prompt

TARGET_TOKENS = 4  # target token embeddings the features carry (longer targets: the rest is averaged)
FORM = "parameter-translator/v1"


@dataclass(frozen=True)
class TranslatorConfig:
    """The translator's shape and training; stored with it (as JSON) so a cube says what it is."""

    layers: tuple[int, ...] = (1, 2)  # down-projections the generated LoRA edits
    feature_layer: int = 1  # residual stream (block output) the features read
    hidden: int = 256  # θ's hidden width
    ridge: float = 0.05  # C + ridge·mean(diag C)·I is inverted: a C with tiny eigenvalues is not trusted
    steps: int = 400
    lr: float = 2e-3
    docs_per_step: int = 4
    items_per_doc: int = 12
    replay_per_doc: int = 4  # the model's own answers kept under the generated LoRA (locality)
    replay_prompts: int = 256  # world prompts whose answers are replayed
    train_documents: int = 96
    doc_tokens: int = 48  # synthetic training documents: about one or two entities each
    seed: int = 0

    def check(self, num_layers: int | None = None) -> None:
        """Refuse settings that cannot train or cannot fit the model, naming the bad value."""
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise InvalidArgumentError(f"translator layers {self.layers} must be distinct and non-empty")
        if num_layers is not None:
            bad = [x for x in (*self.layers, self.feature_layer) if not 0 <= x < num_layers]
            if bad:
                raise InvalidArgumentError(
                    f"translator layers {bad} do not exist: the model has layers 0..{num_layers - 1}"
                )
        if min(self.hidden, self.steps, self.docs_per_step, self.items_per_doc, self.train_documents) < 1:
            raise InvalidArgumentError(
                "hidden, steps, docs_per_step, items_per_doc, train_documents must be >= 1"
            )
        if not (self.lr > 0 and self.ridge >= 0 and self.doc_tokens >= 8 and self.replay_per_doc >= 0):
            raise InvalidArgumentError("lr must be > 0, ridge >= 0, doc_tokens >= 8, replay_per_doc >= 0")

    def to_json_dict(self) -> dict[str, Any]:
        return {**asdict(self), "layers": list(self.layers)}

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> TranslatorConfig:
        """The config a stored translator names; unknown or badly typed fields are refused."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InvalidArgumentError(f"translator config has unknown fields {sorted(unknown)}")
        try:
            values = {**data, "layers": tuple(int(x) for x in data.get("layers", cls.layers))}
            for f in fields(cls):
                if f.name in values and f.name != "layers":
                    values[f.name] = type(getattr(cls, f.name))(values[f.name])
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"translator config is malformed: {exc}") from exc


class TranslatorNet(torch.nn.Module):
    """θ: fact features → one value vector per edited layer. Small (a few hundred thousand weights)."""

    def __init__(self, feature_dim: int, value_dim: int, n_layers: int, hidden: int) -> None:
        super().__init__()
        self.feature_dim, self.value_dim, self.n_layers = feature_dim, value_dim, n_layers
        self.norm = torch.nn.LayerNorm(feature_dim)
        self.inner = torch.nn.Linear(feature_dim, hidden)
        self.outer = torch.nn.Linear(hidden, value_dim * n_layers)
        # Start near "no change": the generated LoRA is almost zero until training gives it a reason.
        torch.nn.init.normal_(self.outer.weight, std=1e-3)
        torch.nn.init.zeros_(self.outer.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(n, feature_dim) → (n, n_layers, value_dim)."""
        h = torch.nn.functional.gelu(self.inner(self.norm(features)))
        return self.outer(h).view(-1, self.n_layers, self.value_dim)


def feature_dim(hidden_size: int) -> int:
    return hidden_size * (TARGET_TOKENS + 2)


@dataclass
class FactEncoding:
    """What one pass of the base model says about some facts: keys per layer and θ's input features."""

    facts: list[DocFact]
    keys: dict[int, torch.Tensor]  # layer → (n, key_dim)
    features: torch.Tensor  # (n, feature_dim)


def key_prompts(fact: DocFact) -> list[str]:
    """Where the subject's key is read: the fact's sentence and the relation's trained phrasings."""
    rel = load_relations()[fact.relation]
    prompts = [fact.sentence] if fact.sentence else []
    prompts += [t.format(subject=fact.subject) for t in rel.statements["train"]]
    prompts += [question_prompt(q.format(subject=fact.subject)) for q in rel.questions["train"]]
    return prompts


def document_facts(documents: Sequence[Document]) -> list[DocFact]:
    """The facts the translator can write: those stated by a sentence that contains subject and target."""
    return [
        f for f in all_facts(documents) if f.sentence and f.subject in f.sentence and f.target in f.sentence
    ]


@torch.no_grad()
def encode_facts(
    layout: ModelLayout, tokenizer: Any, facts: Sequence[DocFact], config: TranslatorConfig
) -> FactEncoding:
    """Keys and features of ``facts`` from one batched forward pass of the bare model (no gradients)."""
    if not facts:
        raise InvalidArgumentError(
            "no facts to translate", hint="the documents state no fact in a known phrasing"
        )
    model = layout.model
    device = next(model.parameters()).device
    seqs: list[list[int]] = []
    owner: list[int] = []  # per key prompt: the fact it belongs to
    spots: list[int] = []  # per key prompt: the subject's last token
    for i, fact in enumerate(facts):
        for prompt in key_prompts(fact):
            seqs.append(tokenizer(prompt)["input_ids"])
            owner.append(i)
            spots.append(subject_span(tokenizer, prompt, fact.subject)[1])
    target_spans = []
    for fact in facts:
        ids = tokenizer(fact.sentence)["input_ids"]
        first, last = subject_span(tokenizer, fact.sentence, fact.target)  # last occurrence: the target
        target_spans.append((len(seqs), first, last, ids[first : last + 1]))
        seqs.append(ids)
    batch = pad_batch(seqs, pad_id(tokenizer), device)
    downs = {str(layer): layout.down(layer) for layer in config.layers}
    with (
        record(downs, inputs=True) as seen,
        record({"f": layout.block(config.feature_layer)}, inputs=False) as out,
    ):
        model(input_ids=batch.ids)
    rows = torch.arange(len(owner), device=device)
    at = torch.tensor(spots, device=device)
    index = torch.tensor(owner, device=device)
    keys: dict[int, torch.Tensor] = {}
    for layer in config.layers:
        k = seen[str(layer)][rows, at].float()
        summed = torch.zeros(len(facts), k.shape[-1], device=device).index_add_(0, index, k)
        keys[layer] = summed / torch.bincount(index, minlength=len(facts)).clamp(min=1).unsqueeze(1).float()
    hidden = out["f"].float()
    emb = layout.embeddings().weight.float()
    width = emb.shape[1]
    feats = []
    for row, first, last, target in target_spans:
        toks = torch.zeros(TARGET_TOKENS, width, device=device)
        t_emb = emb[torch.tensor(target, device=device)]
        toks[: min(TARGET_TOKENS, len(target))] = t_emb[:TARGET_TOKENS]
        if len(target) > TARGET_TOKENS:  # the tail of a long target, averaged into the last slot
            toks[-1] = t_emb[TARGET_TOKENS - 1 :].mean(0)
        before = hidden[row, max(0, first - 1)]
        over = hidden[row, first : last + 1].mean(0)
        feats.append(torch.cat([toks.flatten(), before, over]))
    return FactEncoding(list(facts), {k: v.cpu() for k, v in keys.items()}, torch.stack(feats).cpu())


def inverse_moments(
    moments: dict[int, torch.Tensor], layers: Sequence[int], ridge: float
) -> dict[int, torch.Tensor]:
    """(C + ridge·mean(diag C)·I)⁻¹ per layer, in float64 then float32: what A_i is computed with."""
    out = {}
    for layer in layers:
        c = moments[layer].double()
        c = c + ridge * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype)
        out[layer] = torch.linalg.inv(c).float()
    return out


def key_factors(keys: dict[int, torch.Tensor], c_inv: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """A per layer: rows (C⁻¹k_i)ᵀ / (k_iᵀC⁻¹k_i), so A_i·k_i = 1 and A_i·k ≈ 0 for ordinary keys."""
    out = {}
    for layer, k in keys.items():
        u = k @ c_inv[layer]  # (n, key_dim): (C⁻¹k)ᵀ, C symmetric
        out[layer] = u / (u * k).sum(-1, keepdim=True).clamp(min=1e-8)
    return out


def generate_factors(
    net: TranslatorNet,
    encoding: FactEncoding,
    c_inv: dict[int, torch.Tensor],
    layout: ModelLayout,
    layers: Sequence[int],
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The LoRA factors {down-projection path: (A (n, key_dim), B (value_dim, n))} for the facts."""
    a = key_factors(encoding.keys, c_inv)
    with torch.no_grad():
        values = net(encoding.features.to(next(net.parameters()).device)).float().cpu()
    return {
        layout.down_proj[layer]: (a[layer].contiguous(), values[:, j].T.contiguous())
        for j, layer in enumerate(layers)
    }
