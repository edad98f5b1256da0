"""``memfed pki``: the network CA and the certificates nodes and the registry use for mutual TLS."""

from __future__ import annotations

from pathlib import Path

import click

from memfed.cli.options import json_option
from memfed.cli.output import console, emit_json

pki_dir_option = click.option(
    "--dir",
    "pki_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="PKI folder holding the CA. Default: $MEMFED_HOME/pki.",
)


def _pki_dir(pki_dir: Path | None) -> Path:
    from memfed.config import memfed_home

    return pki_dir or memfed_home() / "pki"


@click.group()
def pki() -> None:
    """The network's certificate authority and node certificates (x509, for mutual TLS)."""


@pki.command("init")
@pki_dir_option
@click.option("--name", default="memfed network CA", show_default=True, help="The CA's common name.")
@click.option(
    "--force", is_flag=True, help="Replace an existing CA (every certificate it issued stops working)."
)
@json_option
def init_cmd(pki_dir: Path | None, name: str, force: bool, as_json: bool) -> None:
    """Create the network CA (ca.pem, and ca.key with mode 0600)."""
    from memfed.registry.pki import init_ca

    d = _pki_dir(pki_dir)
    ca = init_ca(d, name=name, force=force)
    if as_json:
        emit_json({"directory": str(d), "ca_cert": str(ca), "ca_key": str(d / "ca.key")})
    else:
        console.print(f"created the network CA in {d}\n  give every node {ca}; keep {d / 'ca.key'} private")


@pki.command("issue")
@click.argument("name")
@pki_dir_option
@click.option(
    "--host", "hosts", multiple=True, help="Extra DNS name or IP the peer is reached at (repeatable)."
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where to write cert.pem, key.pem, ca.pem. Default: DIR/NAME.",
)
@click.option("--days", type=int, default=825, show_default=True, help="Validity in days.")
@click.option("--force", is_flag=True, help="Replace an existing certificate for NAME.")
@json_option
def issue_cmd(
    name: str,
    pki_dir: Path | None,
    hosts: tuple[str, ...],
    out_dir: Path | None,
    days: int,
    force: bool,
    as_json: bool,
) -> None:
    """Issue a certificate for node (or registry) NAME: its common name is NAME, the node id peers check."""
    from memfed.registry.pki import issue

    cert = issue(_pki_dir(pki_dir), name, hosts=hosts, days=days, force=force, out_dir=out_dir)
    info = {
        "name": name,
        "cert": str(cert.cert),
        "key": str(cert.key),
        "ca": str(cert.ca),
        "fingerprint": cert.fingerprint,
        "directory": str(cert.cert.parent),
    }
    if as_json:
        emit_json(info)
    else:
        console.print(
            f"issued {name}: {cert.cert} (key {cert.key}, mode 0600)\n  pass --tls {cert.cert.parent}"
            f"\n  fingerprint {cert.fingerprint[:32]}…"
        )
