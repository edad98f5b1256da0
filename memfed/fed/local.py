"""A node's side of a round: read its local data, train a fresh LoRA on top of the shared cube.

The node's data never leaves this module: what comes out is the trained factors and a sample count.
Training is ``memfed.node.conversion.train.train_lora`` (PEFT), the same loop internalization uses, so
a federated module is trained exactly as a local one would be. The shared cube is merged into the base
weights for the length of the call (and the original weights put back bit for bit afterwards), so the
update is a residual on top of it: what the server's exact aggregation sums.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memfed.errors import InvalidArgumentError, NotFoundError
from memfed.fed.aggregate import Factors
from memfed.node.conversion.augment import TrainingItem, augment
from memfed.node.conversion.documents import Document
from memfed.node.conversion.train import LoraTrainConfig, train_lora

_TEXT_SUFFIXES = (".md", ".txt")
_DB_SUFFIXES = (".db", ".sqlite", ".sqlite3")


def load_documents(path: str | Path) -> list[Document]:
    """The node's local data as documents.

    ``path`` is a plaintext memory (``.db``/``.sqlite``: its active documents), a directory (every
    ``.md``/``.txt`` file in it) or one text file. Raises NotFoundError when it does not exist and
    InvalidArgumentError when it holds no text.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise NotFoundError(f"local data {str(p)!r} does not exist", hint="pass --data a file or folder")
    if p.is_file() and p.suffix in _DB_SUFFIXES:
        from memfed.node.plaintext import PlaintextMemory

        with PlaintextMemory(p) as memory:
            docs = [Document(d.doc_id, d.title, d.text) for d in memory.list(status="active")]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in _TEXT_SUFFIXES)
        docs = [Document(f.stem, f.stem, f.read_text(encoding="utf-8")) for f in files]
    else:
        docs = [Document(p.stem, p.stem, p.read_text(encoding="utf-8"))]
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise InvalidArgumentError(f"local data {str(p)!r} holds no text to train on")
    return docs


def training_items(path: str | Path) -> list[TrainingItem]:
    """The training items the node's documents make (the same augmentation internalization uses)."""
    return augment(load_documents(path))


@dataclass
class LocalUpdate:
    """One node's residual update (scaling folded into B) and how many items it was trained on."""

    factors: Factors
    num_examples: int
    loss: float
    seconds: float


@contextmanager
def merged_into(model: torch.nn.Module, shared: Factors, *, fan_in_fan_out: bool = False) -> Iterator[None]:
    """Add each module's ΔW = B A to the base weight for the block; restore the exact originals after."""
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for module, (a, b) in shared.items():
                weight = model.get_submodule(module).weight
                saved[module] = weight.detach().clone()
                d = (b.double() @ a.double()).to(weight.dtype)
                weight.add_(d.T if fan_in_fan_out else d)
        yield
    finally:
        with torch.no_grad():
            for module, original in saved.items():
                model.get_submodule(module).weight.copy_(original)


def train_update(
    model: torch.nn.Module,
    tokenizer: Any,
    items: list[TrainingItem],
    shared: Factors,
    config: LoraTrainConfig,
    *,
    fan_in_fan_out: bool = False,
) -> LocalUpdate:
    """Train a fresh LoRA on ``items`` on top of ``shared``; return its factors with scaling folded in.

    Use the same ``config.seed`` on every node of a round: the fresh A's then start equal, the shared
    initialisation FedIT assumes, so the FedIT baseline is measured at its best.
    """
    if not items:
        raise InvalidArgumentError("this node has no training items", hint="check its --data")
    with merged_into(model, shared, fan_in_fan_out=fan_in_fan_out):
        trained = train_lora(model, tokenizer, items, config)
    factors: Factors = {}
    for module, (a, b) in trained.factors.items():
        scaling = trained.alpha[module] / int(a.shape[0])
        factors[module] = (a.float().contiguous(), (b.double() * scaling).float().contiguous())
    return LocalUpdate(factors, len(items), trained.final_loss, trained.seconds)
