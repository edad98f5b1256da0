"""Host models: find, build and load the causal LM a node serves.

The public entry points the CLI (``memfed model init``, ``--model DIR``) and the node use:

- ``default_model_dir()``: the embedded default model, built locally once per recipe and cached;
- ``resolve_model_dir(model)``: ``None`` means the default, anything else must be a local HF directory;
- ``load_host_model(model)``: (model, tokenizer) in eval mode on CUDA when present, else CPU;
- ``build_default_model``, ``tiny_llama``, ``tiny_gpt2``, ``save_tiny_model_dir``: re-exported.

Nothing here downloads: a hub id such as ``"gpt2"`` is refused with ``NotFoundError`` rather than
fetched, because a node must run offline and must never load weights nobody vetted.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from memfed.errors import NotFoundError, UnsupportedError
from memfed.node.default_model import (
    BUILD_INFO_FILE,
    DEFAULT_RECIPE,
    BuildReport,
    Progress,
    build_default_model,
)
from memfed.node.model_cache import ensure_built, models_cache_dir
from memfed.node.offline import ensure_offline
from memfed.node.tiny_models import save_tiny_model_dir, tiny_gpt2, tiny_llama

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "BuildReport",
    "build_default_model",
    "default_model_dir",
    "load_host_model",
    "resolve_model_dir",
    "save_tiny_model_dir",
    "tiny_gpt2",
    "tiny_llama",
]

DEFAULT_SEED = 0

ensure_offline()


def default_model_name(seed: int = DEFAULT_SEED) -> str:
    """Cache folder name: changes whenever the recipe, the fact data or ``RECIPE_VERSION`` change."""
    return f"memfed-default-llama-{DEFAULT_RECIPE.hash(seed)}"


def default_model_dir(*, progress: Progress | None = None, rebuild: bool = False) -> Path:
    """The embedded default model's directory, building it first if this machine has none.

    The first call on a machine takes minutes (see ``memfed_build.json`` in the directory for the time
    and quality figures); later calls return at once. Concurrent callers build it once: the others wait
    for the lock and reuse the result. ``progress(step, total)`` reports training steps.
    """
    target = models_cache_dir() / default_model_name()

    def build(tmp: Path) -> None:
        build_default_model(tmp, seed=DEFAULT_SEED, progress=progress)

    return ensure_built(target, build, marker=BUILD_INFO_FILE, rebuild=rebuild)


def resolve_model_dir(model: str | Path | None) -> Path:
    """``None`` -> the default model (built if needed); else a local HF model directory.

    Raises ``NotFoundError`` when ``model`` is not a directory holding ``config.json``; never downloads.
    """
    if model is None:
        return default_model_dir()
    path = Path(model).expanduser()
    hint = (
        "pass a local Hugging Face model directory (with config.json), or omit --model for the "
        "embedded default; memfed never downloads models"
    )
    if not path.is_dir():
        raise NotFoundError(f"model directory {str(model)!r} does not exist", hint=hint)
    if not (path / "config.json").is_file():
        raise NotFoundError(f"{str(path)!r} is not a model directory: it has no config.json", hint=hint)
    return path.resolve()


def load_host_model(
    model: str | Path | None = None, *, device: str | None = None, dtype: torch.dtype | str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model, tokenizer) from ``resolve_model_dir(model)``, in eval mode.

    ``device`` defaults to CUDA when available, else CPU; ``dtype`` defaults to what the checkpoint
    says. A tokenizer without a pad token gets its eos token as pad (GPT-2 style checkpoints), so
    batched calls work on any model.
    """
    path = resolve_model_dir(model)
    ensure_offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        lm = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ValueError as exc:  # e.g. a config of an architecture that is not a causal LM
        raise UnsupportedError(f"cannot load {path} as a causal language model: {exc}") from exc
    except OSError as exc:  # config.json present but weights or tokenizer files missing
        raise NotFoundError(f"incomplete model directory {path}: {exc}") from exc
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    lm.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    lm.eval()
    return lm, tokenizer
