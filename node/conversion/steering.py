"""Activation → parameter: steering vectors from contrast pairs, and their distillation into a LoRA.

A *steering vector* (contrastive activation addition, CAA) is the mean difference of one decoder block's
output between completions that show a behaviour and completions that do not: for each contrast pair
(prompt, positive answer, negative answer), the block's residual output averaged over the answer tokens
of ``prompt + positive`` minus the same for ``prompt + negative``, then averaged over pairs. Added back
(times a strength) to that block's output at every position, it moves the model toward the behaviour.
It is a ``steering`` cube: the vector, the block and the strength, bound to the base model.

A hook is cheap but lives outside the module runtime; a behaviour that is steered often is better served
as a module. ``distill`` trains a PEFT LoRA whose next-token distributions match the steered model's on
the pairs' texts plus neutral prompts (KL(steered ‖ student), teacher logits computed once), and the
result is a LoRA cube tagged ``behavior_module``. Fidelity is reported as KL to the steered model next
to the unsteered model's KL to it, on held-out prompts, and as the behaviour rate the pairs define
(fraction of pairs whose positive answer the model scores above the negative one).

The shipped behaviour for the embedded model is *context faithfulness*: an open-book prompt whose
passage contradicts what the model memorized; positive = the passage's answer, negative = the memorized
one. The bare model follows the passage about a third of the time (its build report's
``open_book_counterfactual``), so there is room to steer.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from memfed.cube.build import lora_cube, tensor_cube
from memfed.cube.core import MemCube
from memfed.cube.manifest import kind_name, ref_string
from memfed.cube.payload import tensor_views
from memfed.errors import InvalidArgumentError, NotFoundError, UnsupportedError
from memfed.mip.v1 import cube_pb2
from memfed.node.conversion.train import (
    BatchOrder,
    LoraTrainConfig,
    Progress,
    TrainedLora,
    fit,
    lora_factors,
    peft_lora,
)
from memfed.node.editing.arch import layout_of
from memfed.node.editing.text import Encoded, encode, pad_batch, pad_id, target_logprobs

if TYPE_CHECKING:
    from memfed.node.store import CubeStore

BLOCK_KEY = "memfed.steer.block"
LAYER_KEY = "memfed.steer.layer"
STRENGTH_KEY = "memfed.steer.strength"
BEHAVIOR_TAG = "behavior_module"
DISTILL_METHOD = "distill-steering"
EXTRACT_METHOD = "extract-steering"
VECTOR_NAME = "steering.vector"
STRENGTHS = (0.5, 1.0, 2.0, 4.0, 8.0)  # tried by ``extract`` when no strength is given
_BATCH = 64
_MAX_PAIRS = 100_000
_DEAD_STATES = (cube_pb2.LIFECYCLE_STATE_ARCHIVED, cube_pb2.LIFECYCLE_STATE_EXPIRED)


@dataclass(frozen=True)
class ContrastPair:
    """One prompt with an answer that shows the behaviour and one that does not."""

    prompt: str
    positive: str
    negative: str


def parse_pair(record: Any, where: str = "pair") -> ContrastPair:
    """A pair from a JSON object ``{"prompt", "positive", "negative"}``; a clear error otherwise."""
    if not isinstance(record, dict):
        raise InvalidArgumentError(f"{where}: expected an object with prompt, positive and negative")
    values = []
    for key in ("prompt", "positive", "negative"):
        value = record.get(key)
        if not isinstance(value, str) or not value.strip():
            raise InvalidArgumentError(f"{where}: {key!r} must be a non-empty string")
        values.append(value)
    if values[1].strip() == values[2].strip():
        raise InvalidArgumentError(f"{where}: the positive and negative answers are the same")
    return ContrastPair(*values)


def load_pairs(path: str | Path) -> list[ContrastPair]:
    """Contrast pairs from a JSONL file (one ``{"prompt", "positive", "negative"}`` object per line)."""
    p = Path(path)
    if not p.is_file():
        raise NotFoundError(f"no contrast-pair file at {p}")
    pairs = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidArgumentError(f"{p}:{i}: not JSON ({exc.msg})") from None
        pairs.append(parse_pair(record, f"{p}:{i}"))
        if len(pairs) > _MAX_PAIRS:
            raise InvalidArgumentError(f"{p}: more than {_MAX_PAIRS} pairs")
    if not pairs:
        raise InvalidArgumentError(f"{p} holds no contrast pairs")
    return pairs


def context_pairs(split: str = "train") -> list[ContrastPair]:
    """The shipped behaviour (context faithfulness) for the embedded model's facts: ``train`` uses two
    facts in three, ``heldout`` the rest, so evaluation asks about facts the vector never saw."""
    from memfed.node import facts as facts_mod

    if split not in ("train", "heldout"):
        raise InvalidArgumentError(f"split must be 'train' or 'heldout', not {split!r}")
    relations = facts_mod.load_relations()
    out = []
    for i, f in enumerate(facts_mod.load_facts()):
        if (i % 3 == 2) != (split == "heldout") or not f.alt_target:
            continue
        rel = relations[f.relation]
        passage = facts_mod.statement_sentence(rel.statements["train"][i % 2], f.subject, f.alt_target)
        question = rel.questions["train"][0].format(subject=f.subject)
        out.append(ContrastPair(facts_mod.open_book_prompt(passage, question), f.alt_target, f.target))
    return out


def neutral_prompts(limit: int = 64) -> list[str]:
    """Closed-book questions about the model's facts: text the behaviour should not be about."""
    from memfed.node import facts as facts_mod

    relations = facts_mod.load_relations()
    facts = facts_mod.load_facts()[::3][:limit]
    return [
        facts_mod.question_prompt(relations[f.relation].questions["heldout"][0].format(subject=f.subject))
        for f in facts
    ]


# -- the vector and its hook ------------------------------------------------------------------------


@dataclass
class SteeringVector:
    """A vector added to one decoder block's output, times ``strength``."""

    block: str  # module path of the decoder block
    layer: int
    vector: torch.Tensor  # (hidden,)
    strength: float = 1.0


def _output_tensor(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@contextmanager
def steered(
    model: torch.nn.Module, steering: SteeringVector, strength: float | None = None
) -> Iterator[None]:
    """``model`` with ``steering`` added to its block's output at every position, for the block."""
    s = steering.strength if strength is None else strength
    block = layout_of(model).block(steering.layer)
    param = next(model.parameters())
    delta = (s * steering.vector).to(device=param.device, dtype=param.dtype)

    def hook(_module: Any, _args: Any, out: Any) -> Any:
        if isinstance(out, tuple):
            return (out[0] + delta, *out[1:])
        return out + delta

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _answer_items(tokenizer: Any, prompts: Sequence[str], answers: Sequence[str]) -> list[Encoded]:
    return [encode(tokenizer, p, target=a) for p, a in zip(prompts, answers, strict=True)]


def _batches(items: Sequence[Encoded], size: int = _BATCH) -> Iterator[list[Encoded]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def answer_logprobs(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], answers: Sequence[str]
) -> list[float]:
    """Summed log-probability of each answer after its prompt (teacher forced)."""
    device = next(model.parameters()).device
    out: list[float] = []
    with torch.no_grad():
        for chunk in _batches(_answer_items(tokenizer, prompts, answers)):
            batch = pad_batch([it.full for it in chunk], pad_id(tokenizer), device)
            logits = model(input_ids=batch.ids).logits
            out += [float(lp.sum()) for lp in target_logprobs(logits, chunk)]
    return out


@dataclass(frozen=True)
class Behaviour:
    """How strongly a model shows the behaviour on some pairs."""

    rate: float  # fraction of pairs whose positive answer scores above the negative one
    margin: float  # mean log-probability of positive minus negative

    def to_dict(self) -> dict[str, float]:
        return {"rate": round(self.rate, 4), "margin": round(self.margin, 4)}


def behaviour(model: torch.nn.Module, tokenizer: Any, pairs: Sequence[ContrastPair]) -> Behaviour:
    """The behaviour metric the pairs define, on ``model`` as it is (hooks and modules included)."""
    if not pairs:
        raise InvalidArgumentError("no contrast pairs to measure the behaviour on")
    prompts = [p.prompt for p in pairs]
    pos = answer_logprobs(model, tokenizer, prompts, [p.positive for p in pairs])
    neg = answer_logprobs(model, tokenizer, prompts, [p.negative for p in pairs])
    diffs = [a - b for a, b in zip(pos, neg, strict=True)]
    return Behaviour(sum(d > 0 for d in diffs) / len(diffs), sum(diffs) / len(diffs))


def _mean_answer_activation(
    model: torch.nn.Module, tokenizer: Any, block: torch.nn.Module, items: Sequence[Encoded]
) -> torch.Tensor:
    """Mean over items of the block's output averaged over each item's answer tokens (float64)."""
    captured: list[torch.Tensor] = []
    handle = block.register_forward_hook(lambda _m, _a, out: captured.append(_output_tensor(out).detach()))
    device = next(model.parameters()).device
    total: torch.Tensor | None = None
    try:
        with torch.no_grad():
            for chunk in _batches(items):
                captured.clear()
                model(input_ids=pad_batch([it.full for it in chunk], pad_id(tokenizer), device).ids)
                hidden = captured[-1].to(torch.float64)
                for i, it in enumerate(chunk):
                    n = len(it.ids)
                    row = hidden[i, n : n + len(it.target)].mean(0)
                    total = row if total is None else total + row
    finally:
        handle.remove()
    assert total is not None
    return total / len(items)


@dataclass
class ExtractReport:
    layer: int
    strength: float
    pairs: int
    vector_norm: float
    behaviour_before: dict[str, float]
    behaviour_steered: dict[str, float]
    sweep: dict[str, float] = field(default_factory=dict)  # "layer/strength" -> behaviour rate
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def extract(
    model: torch.nn.Module,
    tokenizer: Any,
    pairs: Sequence[ContrastPair],
    *,
    layer: int | None = None,
    strength: float | None = None,
) -> tuple[SteeringVector, ExtractReport]:
    """The CAA vector of ``pairs`` at ``layer`` (default: every layer is tried) and its strength (default:
    the smallest of STRENGTHS that reaches the highest behaviour rate on the pairs)."""
    if len(pairs) < 2:
        raise InvalidArgumentError(
            "a steering vector needs at least 2 contrast pairs", hint="give more pairs"
        )
    t0 = time.perf_counter()
    layout = layout_of(model)
    layers = [layout.check_layer(layer)] if layer is not None else list(range(layout.num_layers))
    if strength is not None and not (strength > 0 and strength == strength and strength != float("inf")):
        raise InvalidArgumentError(f"strength must be a positive number, got {strength}")
    prompts = [p.prompt for p in pairs]
    pos = _answer_items(tokenizer, prompts, [p.positive for p in pairs])
    neg = _answer_items(tokenizer, prompts, [p.negative for p in pairs])
    before = behaviour(model, tokenizer, pairs)
    best: tuple[tuple[float, float, float], SteeringVector] | None = None
    sweep: dict[str, float] = {}
    for li in layers:
        block = layout.block(li)
        vec = _mean_answer_activation(model, tokenizer, block, pos) - _mean_answer_activation(
            model, tokenizer, block, neg
        )
        candidate = SteeringVector(layout.blocks[li], li, vec.to(torch.float32))
        for s in (strength,) if strength is not None else STRENGTHS:
            with steered(model, candidate, s):
                b = behaviour(model, tokenizer, pairs)
            sweep[f"{li}/{s:g}"] = round(b.rate, 4)
            key = (b.rate, -s, b.margin)  # highest rate, then the gentlest strength
            if best is None or key > best[0]:
                best = (key, SteeringVector(candidate.block, li, candidate.vector, s))
    assert best is not None
    chosen = best[1]
    with steered(model, chosen):
        after = behaviour(model, tokenizer, pairs)
    report = ExtractReport(
        layer=chosen.layer,
        strength=chosen.strength,
        pairs=len(pairs),
        vector_norm=round(float(chosen.vector.norm()), 4),
        behaviour_before=before.to_dict(),
        behaviour_steered=after.to_dict(),
        sweep=sweep,
        seconds=round(time.perf_counter() - t0, 3),
    )
    return chosen, report


# -- cubes --------------------------------------------------------------------------------------------


def steering_cube(
    model: torch.nn.Module | cube_pb2.BaseModelFingerprint,
    steering: SteeringVector,
    *,
    cube_id: str,
    version: str = "1.0.0",
    description: str = "",
    sources: Sequence[str] = (),
    params: dict[str, Any] | None = None,
    owner: str = "",
    tags: Sequence[str] = (),
) -> MemCube:
    """A ``steering`` cube: the vector as tensor ``steering.vector``; block, layer and strength in the
    manifest's annotations (what applies it) and in the safetensors header (covered by the digest)."""
    meta = {BLOCK_KEY: steering.block, LAYER_KEY: str(steering.layer), STRENGTH_KEY: repr(steering.strength)}
    origin = cube_pb2.Origin(
        method=EXTRACT_METHOD,
        description=description or f"CAA steering vector at layer {steering.layer}",
        sources=list(sources),
        params={k: str(v) for k, v in (params or {}).items()},
    )
    vector = {VECTOR_NAME: steering.vector.detach().float().contiguous()}
    return tensor_cube(model, vector, "steering", cube_id=cube_id, version=version, origin=origin,
                       owner=owner, tags=tags, metadata=meta, annotations=meta)  # fmt: skip


def read_steering(cube: MemCube) -> SteeringVector:
    """The steering vector a cube holds (verified, finite), or a clear error."""
    m = cube.manifest
    if kind_name(m.kind) != "steering":
        raise UnsupportedError(
            f"cube {ref_string(m)} is a {kind_name(m.kind)} cube, not a steering cube",
            hint="memfed steer works with cubes made by memfed steer extract",
        )
    cube.verify()
    tensors = tensor_views(cube.payload)
    vec = tensors.get(VECTOR_NAME)
    if vec is None or vec.dim() != 1:
        raise InvalidArgumentError(f"steering cube {cube.ref} holds no 1-D tensor {VECTOR_NAME!r}")
    if not bool(torch.isfinite(vec).all()):
        raise InvalidArgumentError(f"steering cube {cube.ref}: the vector holds NaN or Inf values")
    try:
        layer, strength = int(m.annotations[LAYER_KEY]), float(m.annotations[STRENGTH_KEY])
        block = m.annotations[BLOCK_KEY]
    except (KeyError, ValueError):
        raise InvalidArgumentError(
            f"steering cube {cube.ref} does not say its layer, block and strength"
        ) from None
    return SteeringVector(block, layer, vec.float().clone(), strength)


def check_applies(model: torch.nn.Module, steering: SteeringVector) -> None:
    """The vector fits ``model``: its block exists at its layer and the sizes agree."""
    layout = layout_of(model)
    layout.check_layer(steering.layer)
    if layout.blocks[steering.layer] != steering.block:
        raise InvalidArgumentError(
            f"the steering vector is for block {steering.block!r}; this model's layer {steering.layer} is "
            f"{layout.blocks[steering.layer]!r}"
        )
    hidden = layout.value_dim
    if steering.vector.numel() != hidden:
        raise InvalidArgumentError(
            f"the steering vector has {steering.vector.numel()} values; the model's hidden size is {hidden}"
        )


# -- distillation -------------------------------------------------------------------------------------


@dataclass
class DistillReport:
    steps: int
    seconds: float
    final_loss: float
    kl_distilled: float  # KL(steered ‖ distilled) on held-out prompts, per token
    kl_unsteered: float  # KL(steered ‖ bare model): what the module closes
    behaviour_before: dict[str, float]
    behaviour_steered: dict[str, float]
    behaviour_distilled: dict[str, float]

    @property
    def fidelity(self) -> float:
        """1 − KL(steered‖distilled) / KL(steered‖bare): the share of the steering's effect reproduced."""
        return 1.0 - self.kl_distilled / self.kl_unsteered if self.kl_unsteered > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fidelity": round(self.fidelity, 4)}


def _texts(pairs: Sequence[ContrastPair], extra: Sequence[str]) -> list[str]:
    out = []
    for p in pairs:
        out += [f"{p.prompt} {p.positive.strip()}", f"{p.prompt} {p.negative.strip()}"]
    return out + list(extra)


def _encoded(tokenizer: Any, texts: Sequence[str]) -> list[tuple[int, ...]]:
    return [tuple(tokenizer(t)["input_ids"]) for t in texts]


def _log_probs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)


def _kl(teacher: torch.Tensor, student: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked positions of KL(teacher ‖ student), both log-probabilities."""
    per = (teacher.exp() * (teacher - student)).sum(-1)
    return (per * mask).sum() / mask.sum().clamp(min=1.0)


def _mask(lengths: Sequence[int], width: int, device: Any) -> torch.Tensor:
    m = torch.zeros(len(lengths), width, device=device)
    for i, n in enumerate(lengths):
        m[i, :n] = 1.0
    return m


def mean_kl(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    teacher: SteeringVector,
    student: Any = None,
) -> float:
    """Per-token KL(model steered by ``teacher`` ‖ ``student``) over ``texts``; ``student`` is a context
    manager factory that puts the student in place (None: the bare model)."""
    device = next(model.parameters()).device
    seqs = _encoded(tokenizer, texts)
    total = weight = 0.0
    with torch.no_grad():
        for start in range(0, len(seqs), _BATCH):
            batch = pad_batch(seqs[start : start + _BATCH], pad_id(tokenizer), device)
            mask = _mask(batch.lengths, batch.ids.shape[1], device)
            with steered(model, teacher):
                t = _log_probs(model, batch.ids)
            if student is None:
                s = _log_probs(model, batch.ids)
            else:
                with student():
                    s = _log_probs(model, batch.ids)
            n = float(mask.sum())
            total += float(_kl(t, s, mask)) * n
            weight += n
    return total / weight if weight else 0.0


def distill(
    model: torch.nn.Module,
    tokenizer: Any,
    steering: SteeringVector,
    pairs: Sequence[ContrastPair],
    *,
    config: LoraTrainConfig | None = None,
    extra_texts: Sequence[str] = (),
    progress: Progress | None = None,
) -> TrainedLora:
    """Train a PEFT LoRA whose outputs match ``model`` steered by ``steering`` on the pairs' texts (both
    completions of each) and ``extra_texts``; ``model`` is left bare and unchanged."""
    config = config or LoraTrainConfig(rank=8, alpha=16.0, lr=5e-3, steps=150, batch_size=32)
    config.check()
    check_applies(model, steering)
    seqs = _encoded(tokenizer, _texts(pairs, extra_texts))
    if not seqs:
        raise InvalidArgumentError("nothing to distill on", hint="give contrast pairs or texts")
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    teachers: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    with torch.no_grad(), steered(model, steering):
        for s in seqs:  # one row at a time: no padding in the stored teacher distributions
            teachers.append(_log_probs(model, torch.tensor([s], device=device))[0].to(torch.bfloat16))
    model.train(was_training)
    generator = torch.Generator().manual_seed(config.seed)
    steps = config.steps_for(len(seqs))
    t0 = time.perf_counter()
    order = BatchOrder(len(seqs), config.batch_size, generator)

    def loss_of_next_batch(peft_model: Any) -> torch.Tensor:
        chunk = order.next()
        batch = pad_batch([seqs[i] for i in chunk], pad, device)
        width = batch.ids.shape[1]
        teacher = torch.zeros(len(chunk), width, teachers[0].shape[-1], device=device)
        for row, i in enumerate(chunk):
            teacher[row, : len(seqs[i])] = teachers[i].float()
        return _kl(teacher, _log_probs(peft_model, batch.ids), _mask(batch.lengths, width, device))

    with peft_lora(model, config) as peft_model:
        peft_model.eval()  # no dropout anywhere: match the teacher's deterministic outputs
        loss_value = fit(peft_model, config, steps, loss_of_next_batch, progress)
        factors, alpha = lora_factors(peft_model)
    return TrainedLora(factors, alpha, time.perf_counter() - t0, loss_value, steps)


def distilled_cube(
    model: torch.nn.Module,
    trained: TrainedLora,
    steering_ref: str,
    *,
    cube_id: str,
    version: str = "1.0.0",
    owner: str = "",
) -> MemCube:
    """The distilled LoRA as a module cube tagged ``behavior_module``, its origin naming the steering
    cube it reproduces."""
    origin = cube_pb2.Origin(
        method=DISTILL_METHOD,
        description=f"LoRA distilled from steering cube {steering_ref}",
        sources=[steering_ref],
        params={"steps": str(trained.steps), "final_kl": f"{trained.final_loss:.6f}"},
    )
    return lora_cube(
        model,
        trained.factors,
        cube_id=cube_id,
        version=version,
        alpha=trained.alpha,
        origin=origin,
        owner=owner,
        tags=[BEHAVIOR_TAG],
    )


def evaluate_distilled(
    model: torch.nn.Module,
    tokenizer: Any,
    steering: SteeringVector,
    cube: MemCube,
    pairs: Sequence[ContrastPair],
    *,
    extra_texts: Sequence[str] = (),
    trained: TrainedLora | None = None,
) -> DistillReport:
    """Fidelity of a distilled module on ``pairs`` (held out) and ``extra_texts``, run through the node's
    module runtime exactly as a node serves it."""
    from memfed.node.runtime import ModuleRuntime

    texts = _texts(pairs, extra_texts)
    before = behaviour(model, tokenizer, pairs)
    with steered(model, steering):
        with_vector = behaviour(model, tokenizer, pairs)
    kl_bare = mean_kl(model, tokenizer, texts, steering)
    runtime = ModuleRuntime(model)
    try:
        runtime.load(cube)

        def student() -> Any:
            return runtime.routed(modules=(cube.ref,))

        kl_module = mean_kl(model, tokenizer, texts, steering, student)
        with student():
            distilled = behaviour(model, tokenizer, pairs)
    finally:
        runtime.close()
    return DistillReport(
        steps=trained.steps if trained else 0,
        seconds=round(trained.seconds, 2) if trained else 0.0,
        final_loss=round(trained.final_loss, 6) if trained else 0.0,
        kl_distilled=round(kl_module, 6),
        kl_unsteered=round(kl_bare, 6),
        behaviour_before=before.to_dict(),
        behaviour_steered=with_vector.to_dict(),
        behaviour_distilled=distilled.to_dict(),
    )


# -- usage and the distillation trigger ---------------------------------------------------------------

USAGE_FILE = "steering_uses.json"


def record_use(store: CubeStore, ref: str, n: int = 1) -> int:
    """Count ``n`` more applications of steering cube ``ref``; return its total. The counts live beside
    the store (``steering_uses.json``), written whole to a temporary file and renamed over the old one,
    so a crash never leaves a torn file."""
    path = store.root / USAGE_FILE
    counts = steering_uses(store)
    counts[ref] = counts.get(ref, 0) + n
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(counts, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)
    return counts[ref]


def steering_uses(store: CubeStore) -> dict[str, int]:
    """Applications counted per steering cube ref (empty when none was counted)."""
    path = store.root / USAGE_FILE
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidArgumentError(
            f"{path} is not a usage file", hint="delete it to start counting again"
        ) from None
    return {str(k): int(v) for k, v in raw.items() if isinstance(v, int)} if isinstance(raw, dict) else {}


@dataclass(frozen=True)
class DistillProposal:
    ref: str
    uses: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def distill_proposals(store: CubeStore, *, min_uses: int = 10) -> list[DistillProposal]:
    """Steering cubes applied at least ``min_uses`` times that no live module was distilled from yet
    (the MemOS trigger: a behaviour steered often becomes a module), most used first."""
    done = {
        src
        for m in store.list()
        if m.origin.method == DISTILL_METHOD and m.lifecycle not in _DEAD_STATES
        for src in m.origin.sources
    }
    live = {
        ref_string(m)
        for m in store.list()
        if kind_name(m.kind) == "steering" and m.lifecycle not in _DEAD_STATES
    }
    out = [
        DistillProposal(ref, n)
        for ref, n in steering_uses(store).items()
        if n >= min_uses and ref in live and ref not in done
    ]
    return sorted(out, key=lambda p: (-p.uses, p.ref))
