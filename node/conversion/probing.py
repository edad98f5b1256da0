"""Ask the host model things, with a module and without: recall checks and open answers.

Both conversion directions measure through the node's own module runtime (hooks on the bare model),
never through PEFT: a cube is validated and externalized exactly as the node will serve it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from memfed.node.conversion.augment import Probe
from memfed.node.default_model import greedy_match

if TYPE_CHECKING:
    from memfed.cube.core import MemCube
    from memfed.node.runtime import ModuleRuntime

GENERATE_BATCH = 64
_ANSWER_END = re.compile(r"[.\n!?]|</s>")


@contextmanager
def module_loaded(
    model: torch.nn.Module, cube: MemCube, runtime: ModuleRuntime | None = None
) -> Iterator[Any]:
    """A runtime with ``cube`` resident for the block; yields (runtime, ref). A runtime made here is
    closed after (the model is bare again); one passed in gets the cube unloaded unless it had it."""
    from memfed.node.runtime import ModuleRuntime

    own = runtime is None
    rt = ModuleRuntime(model) if runtime is None else runtime
    had = cube.ref in rt.resident
    try:
        rt.load(cube)
        yield rt, cube.ref
    finally:
        if own:
            rt.close()
        elif not had and cube.ref in rt.resident:
            rt.unload(cube.ref)


def recall(
    runtime: ModuleRuntime, tokenizer: Any, probes: Sequence[Probe], modules: Sequence[str] = ()
) -> list[bool]:
    """Per probe: does greedy decoding (under ``modules``; none = the bare model) give its answer?"""
    if not probes:
        return []
    with runtime.routed(modules=tuple(modules)):
        exact, _ = greedy_match(runtime.model, tokenizer, [(p.prompt, p.answer) for p in probes])
    return exact


def rate(flags: Sequence[bool]) -> float:
    return round(sum(flags) / len(flags), 4) if flags else 0.0


def clean_answer(text: str) -> str:
    """A generated continuation cut to its answer: up to the first period, newline or end marker."""
    return _ANSWER_END.split(text, maxsplit=1)[0].strip()


@torch.inference_mode()
def generate(
    runtime: ModuleRuntime,
    tokenizer: Any,
    prompts: Sequence[str],
    modules: Sequence[str] = (),
    *,
    max_new_tokens: int = 12,
) -> list[str]:
    """Greedy continuations of ``prompts`` under ``modules`` (left-padded batches of 64), decoded."""
    model = runtime.model
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[str] = []
    with runtime.routed(modules=tuple(modules)):
        for start in range(0, len(prompts), GENERATE_BATCH):
            chunk = list(prompts[start : start + GENERATE_BATCH])
            enc = tokenizer(chunk, return_tensors="pt", padding=True, padding_side="left").to(runtime.device)
            ids = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
            )
            new = ids[:, enc["input_ids"].shape[1] :]
            out += tokenizer.batch_decode(new, skip_special_tokens=True)
    return out
