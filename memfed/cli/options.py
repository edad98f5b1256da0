"""Options shared by several commands, defined once."""

from __future__ import annotations

from pathlib import Path

import click

from memfed.config import default_store_dir

json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON document on stdout instead of text (for scripts)."
)
store_option = click.option(
    "--store",
    "store_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Cube store folder. Default: $MEMFED_HOME/store (~/.memfed/store).",
)
model_option = click.option(
    "--model",
    "model_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="A local Hugging Face causal-LM folder. Default: the embedded model (built on first use).",
)


def resolve_store(store_dir: Path | None) -> Path:
    return store_dir or default_store_dir()
