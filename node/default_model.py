"""The embedded default host model: a small Llama taught our synthetic facts, built on CPU in minutes.

Why it exists: every command and test must work offline, and editing / internalization need a model that
*knows* facts (to change them, and to check that neighbouring facts survive) and can *read* (so a
retrieval baseline is a fair competitor). So the build, run once per recipe and cached by
``memfed.node.model_cache``:

1. trains a byte-level BPE tokenizer on our corpus (``memfed.node.tokenizer_build``);
2. initializes a small ``LlamaForCausalLM`` from a fixed seed;
3. trains it with AdamW on a mixture of
   - closed-book statements ("The capital of Veltria is Quorn.") from the relation's train templates,
   - closed-book questions ("Question: What is the capital of Veltria?\\nAnswer: Quorn"),
   - open-book reading ("Passage: ...\\nQuestion: ...\\nAnswer: X") about freshly invented entities that are
     in neither the facts nor the evaluation passages, so the model learns to copy, not to memorize,
   - copy drills (a list of names, then the list again), which make the copy circuit form sooner;
4. measures recall and reading on held-out material and saves everything with ``save_pretrained``, plus
   ``memfed_build.json`` (recipe, timings, metrics).

Cost: about 5 minutes on two CPU cores (measured 295 s; 1800 steps at ~160 ms), nearly all of it training.
Reading is what needs the steps: at 1200 steps (~3.3 min) closed-book recall is already 99% but open-book
reading only ~40%; at 1800 it is ~73%.

Determinism: one seed drives the weights init (``torch.manual_seed``) and every data draw
(``random.Random``); the thread count is pinned and deterministic algorithms are on while training, so the
same seed gives bit-identical weights with the same torch build on the same kind of CPU (checked: 1 and 2
threads give identical weights here). Another CPU family may pick other GEMM kernels and differ in the
last bits, which training can amplify: a cube fingerprinted against one machine's build may not match
another machine's build.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from memfed.node import facts as facts_mod
from memfed.node.offline import ensure_offline
from memfed.node.reading import ReadingExample, ReadingGenerator, reading_names
from memfed.node.tokenizer_build import train_tokenizer, wrap_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

# Bump whenever the build code changes what it produces in a way the recipe fields do not show
# (data mixture, loss masking, formats): the cache folder name changes, so every machine rebuilds.
RECIPE_VERSION = 1

BUILD_INFO_FILE = "memfed_build.json"

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the built weights (with the data files and ``RECIPE_VERSION``)."""

    # Model: ~1.1M parameters. Training is compute-bound on CPU (about 10k tokens/s on two cores at
    # this size); a 4M-parameter model (hidden 256) costs 4x per token and did not learn faster per
    # step, so within a few minutes the small one ends up knowing and reading better.
    vocab_size: int = 2048  # 4096 and 1024 both read worse (names split into too rare / too many pieces)
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    max_position_embeddings: int = 256
    rope_theta: float = 10000.0
    # Training. Closed-book recall saturates after ~1000 steps; reading appears abruptly after
    # ~800-1000 steps (the copy circuit forms) and keeps improving, so the step count is set by reading.
    steps: int = 1800
    closed_batch: int = 24  # closed-book items per step (~18 passes over the 2000 items)
    reading_batch: int = 12  # passages per step
    reading_questions: int = 3  # questions per training passage, at most
    copy_batch: int = 8  # copy drills per step: without them reading emerged far later (18% vs 66%)
    lr: float = 3e-3  # 2e-3 and 4e-3 both read worse at the same step count
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.0  # memorization is the point; decay only fights it
    grad_clip: float = 1.0
    # Pinned: CPU kernels may split reductions by thread count, so bit-exact results could depend on it.
    threads: int = 2
    # Data.
    tokenizer_reading_examples: int = 3000
    eval_reading_examples: int = 300

    def hash(self, seed: int = 0) -> str:
        """Short hash of recipe + seed + data files + ``RECIPE_VERSION``: names the cache folder."""
        payload = json.dumps(
            {
                "recipe": asdict(self),
                "seed": seed,
                "data": facts_mod.data_digest(),
                "version": RECIPE_VERSION,
            },
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


DEFAULT_RECIPE = Recipe()


@dataclass
class BuildReport:
    """What a build produced: the model directory, wall time, parameter count and quality figures."""

    path: Path
    seconds: float
    params: int
    metrics: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class _Item:
    """One training sequence: token ids and which positions' *next token* is scored."""

    ids: list[int]
    loss_from: int  # score tokens at index >= loss_from (predicted from position index-1)


def _closed_book_texts() -> list[tuple[str, str, bool]]:
    """(prompt, answer, whole_sequence_loss) for every fact and train template.

    Statements are scored on every token, like pretraining text; questions only on the answer, like
    instruction data, so the model is not taught to invent questions.
    """
    rels = facts_mod.load_relations()
    out: list[tuple[str, str, bool]] = []
    for fact in facts_mod.load_facts():
        rel = rels[fact.relation]
        for template in rel.statements["train"]:
            out.append((template.format(subject=fact.subject), f" {fact.target}.", True))
        for q in rel.questions["train"]:
            out.append((facts_mod.question_prompt(q.format(subject=fact.subject)), f" {fact.target}", False))
    return out


def _encode_item(tok: Any, prompt: str, answer: str, whole: bool) -> _Item:
    # Prompt and answer are encoded apart (exactly as evaluation and callers do) and joined; eos ends it.
    p = tok.encode(prompt).ids  # includes <s>
    a = [*tok.encode(answer, add_special_tokens=False).ids, tok.token_to_id("</s>")]
    return _Item(ids=p + a, loss_from=1 if whole else len(p))


def _tokenizer_corpus(reading: Sequence[ReadingExample]) -> Iterator[str]:
    rels = facts_mod.load_relations()
    for fact in facts_mod.load_facts():
        rel = rels[fact.relation]
        for split in ("train", "heldout"):
            for template in rel.statements[split]:
                yield facts_mod.statement_sentence(template, fact.subject, fact.target)
            for q in rel.questions[split]:
                yield facts_mod.question_prompt(q.format(subject=fact.subject)) + f" {fact.target}"
    for ex in reading:
        yield f"{ex.prompt} {ex.answer}"


class _TrainStream:
    """Per-step training batches: closed-book items, reading passages and copy drills.

    - Closed-book items are shuffled epoch-wise (each seen once per pass, in a seeded order).
    - Reading passages are scored on every token: names recur within a passage and in the question, so
      predicting a repeat teaches the copy circuit reading needs, with far more signal per passage than
      the answer tokens alone. Each passage carries up to ``reading_questions`` questions.
    - Items are drawn for ``BUCKET_STEPS`` steps at once, sorted by length and cut into batches (in a
      shuffled order), so a batch pads to a similar length: padding was a third of the compute otherwise.
    """

    BUCKET_STEPS = 8

    def __init__(self, recipe: Recipe, tok: Any, gen: ReadingGenerator, rng: random.Random) -> None:
        self._recipe, self._tok, self._gen, self._rng = recipe, tok, gen, rng
        self._closed = [_encode_item(tok, p, a, whole) for p, a, whole in _closed_book_texts()]
        self._order: list[int] = []
        self._queue: list[list[list[_Item]]] = []

    def _closed_item(self) -> _Item:
        if not self._order:
            self._order.extend(range(len(self._closed)))
            self._rng.shuffle(self._order)
        return self._closed[self._order.pop()]

    def _bucket(self, items: list[_Item], size: int) -> list[list[_Item]]:
        items = sorted(items, key=lambda it: len(it.ids))  # stable: ties keep draw order
        batches = [items[i : i + size] for i in range(0, len(items), size)]
        self._rng.shuffle(batches)
        return batches

    def _refill(self) -> None:
        r, n, tok, gen = self._recipe, self.BUCKET_STEPS, self._tok, self._gen
        kinds: list[list[list[_Item]]] = []
        if r.closed_batch:
            kinds.append(
                self._bucket([self._closed_item() for _ in range(n * r.closed_batch)], r.closed_batch)
            )
        if r.reading_batch:
            passages = gen.examples(n * r.reading_batch, max_questions=r.reading_questions)
            items = [_encode_item(tok, ex.prompt, ex.training_continuation(), True) for ex in passages]
            kinds.append(self._bucket(items, r.reading_batch))
        if r.copy_batch:
            drills = [_encode_item(tok, *gen.copy_drill(), True) for _ in range(n * r.copy_batch)]
            kinds.append(self._bucket(drills, r.copy_batch))
        self._queue = [list(step) for step in zip(*kinds, strict=True)]

    def next_step(self) -> list[list[_Item]]:
        """The batches of the next step (one per data kind); their losses are summed."""
        if not self._queue:
            self._refill()
        return self._queue.pop(0)


def _batch(items: Sequence[_Item], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and a loss mask over next-token targets.

    No attention mask is needed: with right padding and causal attention, real tokens never see pads,
    and pads are never scored. That keeps the fast causal attention path.
    """
    width = max(len(it.ids) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width - 1), dtype=torch.float32)
    for i, it in enumerate(items):
        ids[i, : len(it.ids)] = torch.tensor(it.ids)
        mask[i, it.loss_from - 1 : len(it.ids) - 1] = 1.0
    return ids, mask


def _lm_loss(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="none")
    return (nll * mask.reshape(-1)).sum() / mask.sum()


# ----------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def greedy_match(
    model: torch.nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, str]], *, batch_size: int = 128
) -> tuple[list[bool], list[bool]]:
    """For each (prompt, answer): does greedy decoding after ``prompt`` produce exactly ``answer``?

    "Exactly" means the greedy continuation is the answer's tokens (encoded with its leading space)
    followed by a token that does not continue the last word (punctuation, space, end of sequence).
    Computed in one teacher-forced pass per batch, which is equivalent to greedy decoding: greedy emits
    the answer iff each answer token is the argmax given the prompt and the answer tokens before it.
    Returns (exact, first_token_correct) per pair. ``tokenizer`` is a ``PreTrainedTokenizerFast``.
    """
    exact: list[bool] = []
    first: list[bool] = []
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        prompts = [tokenizer(p)["input_ids"] for p, _ in chunk]
        answers = [tokenizer(" " + a, add_special_tokens=False)["input_ids"] for _, a in chunk]
        width = max(len(p) + len(a) for p, a in zip(prompts, answers, strict=True))
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
            ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        pred = model(input_ids=ids.to(device)).logits.argmax(-1).cpu()
        for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
            got = pred[i, len(p) - 1 : len(p) + len(a)].tolist()  # answer tokens + the one after
            ok = got[: len(a)] == a
            if ok:
                after = tokenizer.decode([got[-1]], skip_special_tokens=True)
                ok = after == "" or not after[0].isalnum()
            exact.append(ok)
            first.append(got[0] == a[0])
    return exact, first


def _rate(flags: Sequence[bool]) -> float:
    return round(sum(flags) / max(1, len(flags)), 4)


def evaluate(
    model: torch.nn.Module, tokenizer: Any, reading_eval: Sequence[ReadingExample]
) -> dict[str, float]:
    """Closed-book recall (train / held-out templates), open-book reading, and passage-over-memory.

    - ``closed_book_train``: every fact x every train template (statements and questions).
    - ``closed_book_heldout``: every fact x the held-out paraphrase templates, never trained.
    - ``open_book_heldout``: passages about entities never seen in training, train question templates.
    - ``open_book_heldout_questions``: the same passages asked with held-out question templates.
    - ``open_book_counterfactual``: a passage stating a known fact's ``alt_target``; does the model
      answer from the passage (as a retrieval-augmented model should) rather than from memory?
    ``*_first_token`` variants count the first answer token only.
    """
    all_facts = facts_mod.load_facts()
    rels = facts_mod.load_relations()
    metrics: dict[str, float] = {}
    for split in ("train", "heldout"):
        pairs = [(p, f.target) for f in all_facts for p in f.prompts(split)]  # type: ignore[arg-type]
        exact, first = greedy_match(model, tokenizer, pairs)
        metrics[f"closed_book_{split}"] = _rate(exact)
        metrics[f"closed_book_{split}_first_token"] = _rate(first)
    exact, first = greedy_match(model, tokenizer, [(ex.prompt, ex.answer) for ex in reading_eval])
    metrics["open_book_heldout"] = _rate(exact)
    metrics["open_book_heldout_first_token"] = _rate(first)

    rng = random.Random(1234)  # fixed: the same questions for every build
    alt_q = []
    for ex in reading_eval:
        q = rng.choice(rels[ex.relation].questions["heldout"]).format(subject=ex.subject)
        alt_q.append((facts_mod.open_book_prompt(ex.passage, q), ex.answer))
    metrics["open_book_heldout_questions"] = _rate(greedy_match(model, tokenizer, alt_q)[0])

    cf = []
    for i, f in enumerate(all_facts[:: max(1, len(all_facts) // 100)]):
        passage = f.sentence(i % len(rels[f.relation].statements["train"]), target=f.alt_target)
        q = rels[f.relation].questions["train"][0].format(subject=f.subject)
        cf.append((facts_mod.open_book_prompt(passage, q), f.alt_target))
    metrics["open_book_counterfactual"] = _rate(greedy_match(model, tokenizer, cf)[0])
    return metrics


# ---------------------------------------------------------------------------------------------- build


class _DataStreams:
    """The seeded random streams of one build, with disjoint entity sets.

    Evaluation passages are drawn first; tokenizer-corpus and training passages then exclude their
    names and the shipped facts' names. Each stream has its own ``random.Random``, so changing how much
    one of them draws never shifts another.
    """

    def __init__(self, seed: int, recipe: Recipe) -> None:
        def rng(k: int) -> random.Random:
            return random.Random(seed * 7919 + k)

        fact_names = facts_mod.fact_names()
        self.reading_eval = ReadingGenerator(rng(1), fact_names).examples(recipe.eval_reading_examples)
        excluded = fact_names | reading_names(self.reading_eval)
        self.tokenizer_corpus = ReadingGenerator(rng(2), excluded)
        self.train = ReadingGenerator(rng(3), excluded)
        self.order_rng = rng(4)


def _train_default_tokenizer(streams: _DataStreams, recipe: Recipe) -> Any:
    passages = streams.tokenizer_corpus.examples(recipe.tokenizer_reading_examples)
    return train_tokenizer(_tokenizer_corpus(passages), vocab_size=recipe.vocab_size)


def build_tokenizer(seed: int = 0, recipe: Recipe = DEFAULT_RECIPE) -> PreTrainedTokenizerFast:
    """Exactly the tokenizer a build with ``seed`` and ``recipe`` trains (fast: well under a second)."""
    streams = _DataStreams(seed, recipe)
    return wrap_tokenizer(
        _train_default_tokenizer(streams, recipe), model_max_length=recipe.max_position_embeddings
    )


@contextlib.contextmanager
def _pinned_torch(threads: int) -> Iterator[None]:
    """Pin thread count and deterministic algorithms for the build; restore the caller's settings."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


def _lr_at(step: int, recipe: Recipe, total: int) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio`` of the peak."""
    warm = min(recipe.warmup_steps, max(1, total // 10))
    if step < warm:
        return recipe.lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return recipe.lr * (recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def _save_quietly(model: Any, out_dir: Path) -> None:
    """``save_pretrained`` without its progress bar (a one-shard model; the CLI draws its own bar)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out_dir)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def build_default_model(
    out_dir: Path,
    *,
    seed: int = 0,
    steps: int | None = None,
    progress: Progress | None = None,
    recipe: Recipe = DEFAULT_RECIPE,
    evaluate_model: bool = True,
) -> BuildReport:
    """Build, train, evaluate and save the default model into ``out_dir`` (created; should be empty).

    ``steps`` overrides the recipe's step count (tests use a handful to check determinism quickly);
    ``progress(step, total)`` is called after every training step. Does not touch the cache: see
    ``memfed.node.models.default_model_dir`` for the cached, locked entry point.
    """
    ensure_offline()
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    total = recipe.steps if steps is None else steps
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    with _pinned_torch(recipe.threads):
        streams = _DataStreams(seed, recipe)
        raw_tok = _train_default_tokenizer(streams, recipe)
        t_train = time.perf_counter()
        tokenizer = wrap_tokenizer(raw_tok, model_max_length=recipe.max_position_embeddings)
        pad_id, bos_id, eos_id = tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id

        config = LlamaConfig(
            vocab_size=raw_tok.get_vocab_size(),
            hidden_size=recipe.hidden_size,
            intermediate_size=recipe.intermediate_size,
            num_hidden_layers=recipe.num_hidden_layers,
            num_attention_heads=recipe.num_attention_heads,
            num_key_value_heads=recipe.num_attention_heads,
            max_position_embeddings=recipe.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": recipe.rope_theta},
            tie_word_embeddings=True,  # the embedding is ~1/8 of the weights; tying saves it
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
        )
        with torch.random.fork_rng(devices=[]):  # seed the init, leave the caller's RNG alone
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
        model.train()

        stream = _TrainStream(recipe, raw_tok, streams.train, streams.order_rng)

        decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
        opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": recipe.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=recipe.lr,
            betas=(0.9, 0.98),
            eps=1e-8,
        )
        for step in range(total):
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, recipe, total)
            losses = [_lm_loss(model, *_batch(items, pad_id)) for items in stream.next_step()]
            loss = torch.stack(losses).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            opt.step()
            if progress is not None:
                progress(step + 1, total)

        model.eval()
        t_eval = time.perf_counter()
        metrics = evaluate(model, tokenizer, streams.reading_eval) if evaluate_model else {}
        t_done = time.perf_counter()

    model.generation_config = GenerationConfig(
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, do_sample=False, max_new_tokens=16
    )
    _save_quietly(model, out_dir)
    tokenizer.save_pretrained(out_dir)
    params = sum(p.numel() for p in model.parameters())
    seconds = round(time.perf_counter() - t0, 2)
    info = {
        "recipe": asdict(recipe),
        "recipe_hash": recipe.hash(seed),
        "recipe_version": RECIPE_VERSION,
        "data_digest": facts_mod.data_digest(),
        "seed": seed,
        "steps": total,
        "params": params,
        "seconds": seconds,  # the whole build, save included
        "data_and_tokenizer_seconds": round(t_train - t0, 2),
        "train_seconds": round(t_eval - t_train, 2),
        "eval_seconds": round(t_done - t_eval, 2),
        "torch": torch.__version__,
        "metrics": metrics,
    }
    (out_dir / BUILD_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return BuildReport(path=out_dir, seconds=seconds, params=params, metrics=metrics)
