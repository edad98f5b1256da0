"""``memfed identity``: create and show the node's signing + HPKE identity."""

from __future__ import annotations

from pathlib import Path

import click

from memfed.cli.options import (
    identity_dir_option,
    json_option,
    passphrase_env_option,
    read_passphrase,
    resolve_identity_dir,
)
from memfed.cli.output import console, emit_json


@click.group()
def identity() -> None:
    """This node's identity: an Ed25519 signing key and an HPKE key pair for receiving sealed cubes."""


@identity.command("init")
@identity_dir_option
@click.option("--force", is_flag=True, help="Replace an existing identity (its keys are lost).")
@passphrase_env_option
@click.option("--pq", is_flag=True, help="Receive with hybrid post-quantum HPKE (ML-KEM-768 + X25519).")
@click.option("--name", default="", help="A display name recorded in the public identity.")
@json_option
def init_cmd(
    identity_dir: Path | None, force: bool, passphrase_env: str | None, pq: bool, name: str, as_json: bool
) -> None:
    """Create the signing key and HPKE key pair (files 0600; refuses to overwrite without --force)."""
    from memfed.crypto.identity import PUBLIC_FILE, init_identity

    directory = resolve_identity_dir(identity_dir)
    ident = init_identity(
        directory, passphrase=read_passphrase(passphrase_env), post_quantum=pq, force=force, name=name
    )
    pub = ident.public.to_dict()
    if as_json:
        emit_json({"directory": str(directory), "public_identity_file": str(directory / PUBLIC_FILE), **pub})
    else:
        console.print(
            f"created identity in {directory}\n  fingerprint [bold]{ident.public.fingerprint}[/]\n"
            f"  signing key {ident.key_id}\n  receives with {ident.public.suite.value}\n"
            f"  give peers {directory / PUBLIC_FILE}"
        )


@identity.command("show")
@identity_dir_option
@click.option(
    "-o", "--output", "output", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help="Also write the public identity file here (to hand to peers).",
)  # fmt: skip
@json_option
def show_cmd(identity_dir: Path | None, output: Path | None, as_json: bool) -> None:
    """Print the public identity (both public keys and the fingerprint to compare with peers)."""
    from memfed.crypto.identity import PUBLIC_FILE, load_public_identity

    directory = resolve_identity_dir(identity_dir)
    pub = load_public_identity(directory / PUBLIC_FILE)
    if output is not None:
        output.write_text(pub.to_json())
    if as_json:
        emit_json({"directory": str(directory), **pub.to_dict()})
    else:
        console.print(
            f"fingerprint [bold]{pub.fingerprint}[/]  key {pub.key_id}  suite {pub.suite.value}\n"
            f"public identity file: {directory / PUBLIC_FILE}"
        )
