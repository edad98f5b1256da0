"""Keep the Hugging Face libraries off the network.

memfed never downloads a model, tokenizer or data set at run time: models come from local directories
or are built locally (``memfed.node.default_model``). ``huggingface_hub`` reads ``HF_HUB_OFFLINE`` when it
is first imported, so every memfed function that imports ``transformers`` calls ``ensure_offline()``
first; a user who exported the variable keeps their value. Loads also pass ``local_files_only=True``,
which holds even when ``transformers`` was imported by someone else earlier.
"""

from __future__ import annotations

import os


def ensure_offline() -> None:
    """Set ``HF_HUB_OFFLINE=1`` unless the environment already says otherwise."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
