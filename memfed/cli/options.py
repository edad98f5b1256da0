"""Options shared by several commands, defined once."""

from __future__ import annotations

import os
from pathlib import Path

import click

from memfed.config import default_identity_dir, default_store_dir
from memfed.errors import InvalidArgumentError

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


identity_dir_option = click.option(
    "--dir",
    "--identity",
    "identity_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Identity folder. Default: $MEMFED_HOME/identity (~/.memfed/identity).",
)
passphrase_env_option = click.option(
    "--passphrase-env",
    "passphrase_env",
    metavar="VAR",
    default=None,
    help="Name of an environment variable holding the private keys' passphrase (never on the command line).",
)


def resolve_identity_dir(identity_dir: Path | None) -> Path:
    return identity_dir or default_identity_dir()


def read_passphrase(var: str | None) -> bytes | None:
    """The passphrase from the named environment variable (so it stays out of argv and shell history)."""
    if var is None:
        return None
    value = os.environ.get(var)
    if not value:
        raise InvalidArgumentError(f"environment variable {var} is not set or empty", hint="export it first")
    return value.encode()
