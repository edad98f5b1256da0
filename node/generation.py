"""Generation on a node: one batch, a module set per row, memories chosen by the scheduler's routing.

Rows without a conversation run as one left-padded greedy batch through the runtime's per-row routing
(each row its own modules, or none). Rows of a continuing conversation take the activation-memory path:
the prefix this conversation already computed is reused from the KV-cache store, only the new suffix is
prefilled, and the cache is stored again after the answer for the next turn.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from memfed.errors import InvalidArgumentError
from memfed.node.scheduler import MemScheduler, RoutePlan, _module_key

MAX_NEW_TOKENS = 256
MAX_ROWS = 64


@dataclass(frozen=True)
class RowRequest:
    """One row of a generation batch."""

    prompt: str
    modules: tuple[str, ...] = ()
    max_new_tokens: int = 32
    conversation_id: str = ""
    task: str = ""


@dataclass
class RowResult:
    """What a row produced and which memories served it (``param:``, ``kv:``, ``text:``)."""

    text: str
    memory_used: list[str] = field(default_factory=list)
    new_tokens: int = 0
    reused_tokens: int = 0
    seconds: float = 0.0  # the activation-memory path: lookup + generate


def check_rows(rows: Sequence[RowRequest]) -> None:
    """Refuse malformed batches before any work starts."""
    if not rows:
        raise InvalidArgumentError("a generation request needs at least one row")
    if len(rows) > MAX_ROWS:
        raise InvalidArgumentError(f"{len(rows)} rows in one request; at most {MAX_ROWS}", hint="split it")
    for i, row in enumerate(rows):
        if not row.prompt:
            raise InvalidArgumentError(f"row {i} has an empty prompt")
        if not 0 < row.max_new_tokens <= MAX_NEW_TOKENS:
            raise InvalidArgumentError(f"row {i}: max_new_tokens must be 1..{MAX_NEW_TOKENS}")


class Generator:
    """Greedy generation for a node's model, tokenizer and scheduler."""

    def __init__(self, scheduler: MemScheduler, tokenizer: Any) -> None:
        self.scheduler = scheduler
        self.runtime = scheduler.runtime
        self.model = scheduler.runtime.model
        self.tokenizer = tokenizer

    def generate(self, rows: Sequence[RowRequest]) -> list[RowResult]:
        check_rows(rows)
        plans, prompts = [], []
        for row in rows:
            plan = self.scheduler.route(
                row.prompt,
                modules=row.modules,
                task=row.task,
                conversation_id=row.conversation_id,
                prompt_tokens=self.tokenizer(row.prompt)["input_ids"] if row.conversation_id else None,
            )
            plans.append(plan)
            prompts.append(self._prompt(row.prompt, plan))
        results: list[RowResult | None] = [None] * len(rows)
        batch = [i for i, p in enumerate(plans) if not p.reuse_kv]
        if batch:
            limits = [rows[i].max_new_tokens for i in batch]
            texts = self._batch([prompts[i] for i in batch], [plans[i].modules for i in batch], limits)
            for i, (text, n) in zip(batch, texts, strict=True):
                results[i] = RowResult(text=text, memory_used=plans[i].memory_used, new_tokens=n)
        for i, plan in enumerate(plans):
            if plan.reuse_kv:
                results[i] = self._with_cache(prompts[i], plan, rows[i].max_new_tokens)
        for plan in plans:
            for ref in plan.modules:
                self.scheduler.touch(ref)
        return [r for r in results if r is not None]

    def _prompt(self, prompt: str, plan: RoutePlan) -> str:
        if not plan.passages:
            return prompt
        from memfed.node.plaintext import augment_prompt

        return augment_prompt(prompt, plan.passages)

    @torch.inference_mode()
    def _batch(
        self, prompts: list[str], modules: list[tuple[str, ...]], limits: list[int]
    ) -> list[tuple[str, int]]:
        tok = self.tokenizer
        enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left").to(self.runtime.device)
        with self.runtime.routed([list(m) for m in modules]):
            out = self.model.generate(
                **enc,
                max_new_tokens=max(limits),
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        new = out[:, enc["input_ids"].shape[1] :].tolist()
        results = []
        for ids, limit in zip(new, limits, strict=True):
            ids = ids[:limit]
            if tok.eos_token_id in ids:
                ids = ids[: ids.index(tok.eos_token_id)]
            while ids and ids[-1] == tok.pad_token_id:
                ids.pop()
            results.append((tok.decode(ids, skip_special_tokens=True), len(ids)))
        return results

    def _with_cache(self, prompt: str, plan: RoutePlan, max_new: int) -> RowResult:
        from memfed.node.activation import generate_with_reuse

        kv = self.scheduler.kv_cache
        tok = self.tokenizer
        ids = tok(prompt)["input_ids"]
        key = _module_key(plan.modules)
        stored = kv.stored_tokens(plan.conversation_id, key) or []
        reused = 0
        while reused < min(len(stored), len(ids) - 1) and stored[reused] == ids[reused]:
            reused += 1
        with self.runtime.routed(modules=plan.modules):
            t0 = time.perf_counter()
            out = generate_with_reuse(
                self.model, ids, kv, plan.conversation_id, key,
                max_new_tokens=max_new, do_sample=False,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            )  # fmt: skip
            seconds = time.perf_counter() - t0
        new = out[0, len(ids) :].tolist()
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id)]
        memory = list(plan.memory_used)
        if reused and f"kv:{plan.conversation_id}" not in memory:
            memory.append(f"kv:{plan.conversation_id}")
        return RowResult(
            text=tok.decode(new, skip_special_tokens=True),
            memory_used=memory,
            new_tokens=len(new),
            reused_tokens=reused,
            seconds=seconds,
        )
