"""Forward hooks editing needs: read a module's input or output, and change its output at given tokens.

Hugging Face blocks return a tensor in transformers 5 but a tuple in older releases and some
architectures; these helpers treat "the output" as the tensor (or the tuple's first element) either way.
Every hook is removed when its ``with`` block ends, also on errors, so a failed edit never leaves the
model altered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


def output_tensor(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def replace_output(out: Any, tensor: torch.Tensor) -> Any:
    return (tensor, *out[1:]) if isinstance(out, tuple) else tensor


@contextmanager
def record(modules: dict[str, torch.nn.Module], *, inputs: bool) -> Iterator[dict[str, torch.Tensor]]:
    """Record each module's input (``inputs=True``) or output tensor of the last forward, by name."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in modules.items():

        def hook(mod: torch.nn.Module, args: tuple[Any, ...], out: Any, name: str = name) -> None:
            seen[name] = args[0] if inputs else output_tensor(out)

        handles.append(module.register_forward_hook(hook))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@contextmanager
def patch_output(module: torch.nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace ``module``'s output tensor by ``fn(output)`` while the block runs."""

    def hook(mod: torch.nn.Module, args: tuple[Any, ...], out: Any) -> Any:
        return replace_output(out, fn(output_tensor(out)))

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
