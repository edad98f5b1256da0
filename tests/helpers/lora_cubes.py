"""Random LoRA cubes made through real PEFT, so tests compare the node runtime against PEFT itself."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from memfed.cube.core import MemCube
from memfed.cube.peft_io import import_peft


def peft_lora_cube(
    model: torch.nn.Module,
    cube_id: str,
    *,
    seed: int,
    r: int = 4,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    scale: float = 0.5,
    **config: Any,
) -> MemCube:
    """A PEFT LoRA with random non-zero A and B (so it changes outputs), imported as a cube.

    ``model`` is left unwrapped (PEFT's wrapping is undone before returning).
    """
    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cfg = LoraConfig(
            r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False, **config
        )
        peft_model = get_peft_model(model, cfg)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.normal_(0.0, scale)
        with tempfile.TemporaryDirectory() as tmp:
            peft_model.save_pretrained(Path(tmp) / "a")
            cube = import_peft(Path(tmp) / "a", model, cube_id=cube_id)
        peft_model.unload()
    return cube
