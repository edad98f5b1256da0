"""``memfed registry``: run the registry, and the calls nodes and operators make to it."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from memfed.cli.observe_options import log_json_option, metrics_port_option
from memfed.cli.options import json_option
from memfed.cli.output import console, emit_json, err_console
from memfed.cli.serving import stop_on_signals

REGISTRY_ENV = "MEMFED_REGISTRY"


def _registry_dir(d: Path | None) -> Path:
    from memfed.config import memfed_home

    return d or memfed_home() / "registry"


registry_dir_option = click.option(
    "--dir",
    "registry_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Registry folder (its key, and the SQLite database unless --db). Default: $MEMFED_HOME/registry.",
)
db_option = click.option(
    "--db",
    "db_url",
    default=None,
    metavar="URL",
    help="Database URL, e.g. postgresql+psycopg://user@host:5432/db. Default: SQLite in --dir.",
)


def registry_client_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--registry, --tls/--insecure/--principal; the command receives ``reg`` (a RegistryClient factory)."""
    options = [
        click.option(
            "--registry",
            "registry_addr",
            metavar="HOST:PORT",
            default=None,
            help=f"The registry. Default: ${REGISTRY_ENV}, else 127.0.0.1:7700.",
        ),
        click.option(
            "--tls",
            "tls_dir",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="Folder with this party's cert.pem, key.pem and ca.pem (`memfed pki issue`).",
        ),
        click.option("--insecure", is_flag=True, help="Plaintext to a registry started with --insecure."),
        click.option(
            "--principal",
            "as_principal",
            default=None,
            help="Who you are on an --insecure registry (e.g. node:a).",
        ),
        click.option(
            "--registry-key",
            type=click.Path(dir_okay=False, path_type=Path),
            default=None,
            help="The registry's public identity file: verify signed catalog answers.",
        ),
        click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds per call."),
    ]

    @functools.wraps(fn)
    def wrapper(
        *args: Any,
        registry_addr: str | None,
        tls_dir: Path | None,
        insecure: bool,
        as_principal: str | None,
        registry_key: Path | None,
        timeout: float,
        **kw: Any,
    ) -> Any:
        def make() -> Any:
            from memfed.crypto.identity import load_public_identity
            from memfed.errors import InvalidArgumentError
            from memfed.registry.tls import TlsFiles
            from memfed.registry_client import DEFAULT_REGISTRY_ADDRESS, RegistryClient

            if tls_dir is None and not insecure:
                raise InvalidArgumentError(
                    "no --tls folder given for the registry connection",
                    hint="pass --tls DIR (from `memfed pki issue NAME`), or --insecure (plaintext registry)",
                )
            key = load_public_identity(registry_key).signing_key if registry_key else None
            return RegistryClient(
                registry_addr or os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY_ADDRESS,
                tls=TlsFiles.from_dir(tls_dir) if tls_dir else None,
                principal=as_principal,
                registry_key=key,
                timeout=timeout,
            )

        return fn(*args, reg=make, **kw)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


@click.group()
def registry() -> None:
    """The registry: node identities, the cube catalog, access control and the audit log."""


def _identity_option(help_text: str) -> Callable[[Any], Any]:
    """--identity DIR (required): a node identity folder (`memfed identity init`)."""
    return click.option(
        "--identity",
        "identity_dir",
        type=click.Path(file_okay=False, path_type=Path),
        required=True,
        help=help_text,
    )


@registry.command("serve")
@registry_dir_option
@db_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=7700, show_default=True, help="Port (0: any free port).")
@click.option(
    "--tls",
    "tls_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The registry's certificate folder (`memfed pki issue registry`): mutual TLS.",
)
@click.option(
    "--insecure", is_flag=True, help="Serve plaintext (trusted networks only; logged as a warning)."
)
@click.option(
    "--operator",
    "operators",
    multiple=True,
    help="Certificate name with every right (reads the audit log, grants on any cube).",
)
@click.option(
    "--port-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the bound port here once serving (for scripts using --port 0).",
)
@metrics_port_option
@log_json_option
def serve_cmd(
    registry_dir: Path | None,
    db_url: str | None,
    host: str,
    port: int,
    tls_dir: Path | None,
    insecure: bool,
    operators: tuple[str, ...],
    port_file: Path | None,
    metrics_port: int | None,
    log_json: bool,
) -> None:
    """Serve RegistryService until interrupted (SIGINT/SIGTERM stop it cleanly)."""
    from memfed.errors import InvalidArgumentError
    from memfed.observability import configure_logging
    from memfed.registry.core import Registry
    from memfed.registry.service import RegistryServer
    from memfed.registry.tls import TlsFiles

    configure_logging("info", json_lines=log_json)
    if tls_dir is None and not insecure:
        raise InvalidArgumentError(
            "the registry needs --tls DIR (mutual TLS) or an explicit --insecure",
            hint="create a CA with `memfed pki init` and a certificate with `memfed pki issue registry`",
        )
    tls = TlsFiles.from_dir(tls_dir) if tls_dir else None
    ca_pem = tls.ca.read_bytes() if tls else None
    reg = Registry.open(
        _registry_dir(registry_dir), db_url=db_url, operators=[f"user:{o}" for o in operators], ca_pem=ca_pem
    )
    server = RegistryServer(reg, host=host, port=port, tls=tls, insecure=insecure, metrics_port=metrics_port)

    async def run() -> None:
        bound = await server.start()
        if port_file is not None:
            tmp = port_file.with_suffix(".tmp")
            tmp.write_text(str(bound))
            tmp.replace(port_file)
        if log_json:  # stderr carries JSON lines only
            logging.getLogger("memfed.registry").info(
                "registry serving", extra={"address": f"{host}:{bound}", "key_id": reg.key_id}
            )
        else:
            err_console.print(f"registry serving on {host}:{bound} (key {reg.key_id})")
        stop = stop_on_signals()
        await stop.wait()
        await server.stop(grace=1.0)

    try:
        asyncio.run(run())
    finally:
        reg.close()


@registry.command("register")
@registry_client_options
@_identity_option("The node's identity folder (`memfed identity init`).")
@click.option("--node-id", default=None, help="The node id (default: the --tls certificate's name).")
@click.option("--address", default="", help="host:port of the node's NodeService.")
@json_option
def register_cmd(
    reg: Callable[[], Any], identity_dir: Path, node_id: str | None, address: str, as_json: bool
) -> None:
    """Register this node's certificate and public keys with the registry (over its own mutual TLS)."""
    from memfed.crypto.identity import load_public_identity
    from memfed.registry.node_identity import identity_message

    with reg() as client:
        msg = identity_message(load_public_identity(identity_dir), client_tls_cert(client), node_id, address)
        created = client.register(msg)
    _report({"node_id": msg.node_id, "created": created}, as_json, f"node {msg.node_id} registered")


@registry.command("rotate-cert")
@registry_client_options
@_identity_option("The node's identity folder (its keys stay; only the certificate changes).")
@click.option(
    "--new-cert",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    required=True,
    help="The node's new certificate (`memfed pki issue NAME --force` writes it).",
)
@click.option("--node-id", default=None, help="The node id (default: the new certificate's name).")
@json_option
def rotate_cert_cmd(
    reg: Callable[[], Any], identity_dir: Path, new_cert: Path, node_id: str | None, as_json: bool
) -> None:
    """Replace this node's registered certificate before the old one expires.

    Connect with the node's CURRENT certificate (--tls DIR) and name the new one (--new-cert): the registry
    checks that the new certificate comes from the network CA, names the node and goes with the same
    identity keys, then pins it. Restart the node with the new certificate afterwards; the old one is
    refused from then on.
    """
    from memfed.crypto.identity import load_public_identity
    from memfed.registry.node_identity import identity_message

    with reg() as client:
        msg = identity_message(load_public_identity(identity_dir), new_cert.read_bytes(), node_id, "")
        rotated = client.rotate_certificate(msg)
    line = f"node {msg.node_id}: certificate " + ("rotated" if rotated else "unchanged (already registered)")
    _report({"node_id": msg.node_id, "rotated": rotated}, as_json, line)


def client_tls_cert(client: Any) -> bytes | None:
    return client.tls.cert.read_bytes() if getattr(client, "tls", None) else None


@registry.command("grant")
@registry_client_options
@click.argument("cube_id")
@click.argument("principal")
@click.argument("actions", nargs=-1, required=True)
@click.option("--expires-in", type=float, default=None, help="Seconds until the grant expires.")
@json_option
def grant_cmd(
    reg: Callable[[], Any],
    cube_id: str,
    principal: str,
    actions: tuple[str, ...],
    expires_in: float | None,
    as_json: bool,
) -> None:
    """Grant ACTIONS on CUBE_ID to PRINCIPAL (node:ID, user:ID, group:NAME).

    Actions: read, use, export, admin, feedback (rate a module's answers, which steers how it evolves).
    """
    exp = time.time() + expires_in if expires_in else None
    with reg() as client:
        seq = client.grant(cube_id, principal, actions, expires_at=exp)
    _report({"audit_sequence": seq}, as_json, f"granted {','.join(actions)} on {cube_id} to {principal}")


@registry.command("revoke")
@registry_client_options
@click.argument("cube_id")
@click.argument("principal")
@click.argument("actions", nargs=-1)
@json_option
def revoke_cmd(
    reg: Callable[[], Any], cube_id: str, principal: str, actions: tuple[str, ...], as_json: bool
) -> None:
    """Withdraw PRINCIPAL's grants on CUBE_ID (all actions when none are named) and revoke its tokens."""
    with reg() as client:
        seq = client.revoke(cube_id, principal, actions)
    _report(
        {"audit_sequence": seq},
        as_json,
        f"revoked {','.join(actions) or 'all'} on {cube_id} from {principal}",
    )


@registry.command("token")
@registry_client_options
@click.argument("cube_id")
@click.argument("action")
@click.option("--ttl", type=int, default=60, show_default=True, help="Seconds the token is valid.")
@click.option("--for", "for_principal", default="", help="Another principal (needs admin on the cube).")
@json_option
def token_cmd(
    reg: Callable[[], Any], cube_id: str, action: str, ttl: int, for_principal: str, as_json: bool
) -> None:
    """Ask for a capability token for ACTION on CUBE_ID (printed base64: token and signature)."""
    import base64

    from memfed.mip.v1 import registry_service_pb2 as rpb

    with reg() as client:
        tok = client.issue_token(cube_id, action, principal=for_principal, ttl_s=ttl)
    claims = rpb.TokenClaims.FromString(tok.token)
    info = {
        "token": base64.b64encode(tok.SerializeToString()).decode(),
        "token_id": claims.token_id,
        "principal": claims.principal,
        "expires_at": claims.expires_at.ToJsonString(),
    }
    _report(info, as_json, info["token"])


@registry.command("lookup")
@registry_client_options
@click.argument("cube_id")
@json_option
def lookup_cmd(reg: Callable[[], Any], cube_id: str, as_json: bool) -> None:
    """The catalog's versions of CUBE_ID and which nodes hold each."""
    from memfed.cube.manifest import manifest_from_bytes

    with reg() as client:
        answer = client.lookup(cube_id)
    rows = []
    for e in answer.versions:
        m = manifest_from_bytes(e.manifest.manifest)
        rows.append({"version": m.version, "digest": m.digest, "holders": list(e.holders)})
    info = {
        "cube_id": cube_id,
        "sequence": answer.sequence,
        "versions": rows,
        "expires_at": answer.expires_at.ToJsonString(),
    }
    text = "\n".join(
        f"{cube_id}@{r['version']}  {r['digest'][:19]}…  held by {', '.join(r['holders'])}" for r in rows
    )
    _report(info, as_json, text)


def _report(info: dict[str, Any], as_json: bool, text: str) -> None:
    if as_json:
        emit_json(info)
    else:
        console.print(text, soft_wrap=True)


@registry.command("publish")
@registry_client_options
@click.argument("ref")
@_identity_option("The producing node's identity folder: it signs the manifest.")
@click.option(
    "--store",
    "store_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The node's cube store. Default: $MEMFED_HOME/store.",
)
@click.option("--holder", default="", help="The node holding the payload (default: the --tls name).")
@json_option
def publish_cmd(
    reg: Callable[[], Any], ref: str, identity_dir: Path, store_dir: Path | None, holder: str, as_json: bool
) -> None:
    """Publish REF (cube_id[@version]) from the local store: its signed manifest goes to the catalog; the
    payload stays on this node."""
    from memfed.cli.options import resolve_store
    from memfed.crypto.identity import load_identity
    from memfed.crypto.seal import manifest_for_export
    from memfed.crypto.signing import sign_manifest
    from memfed.cube.manifest import parse_ref, ref_string
    from memfed.node.store import CubeStore

    cube_id, version = parse_ref(ref)
    with CubeStore(resolve_store(store_dir)) as store:
        m = manifest_for_export(store.get_manifest(cube_id, version))
    signed = sign_manifest(m, load_identity(identity_dir))
    with reg() as client:
        seq = client.publish(signed, holder or (client.tls.name if client.tls else ""))
    _report(
        {"ref": ref_string(m), "catalog_sequence": seq},
        as_json,
        f"published {ref_string(m)} (sequence {seq})",
    )


@registry.command("group-add")
@registry_dir_option
@db_option
@click.argument("group")
@click.argument("member")
@json_option
def group_add_cmd(
    registry_dir: Path | None, db_url: str | None, group: str, member: str, as_json: bool
) -> None:
    """Put MEMBER (node:ID or user:ID) in GROUP (e.g. legal_team), on the registry's host. Grants to
    group:GROUP then cover the member."""
    from memfed.registry.core import Registry

    reg = Registry.open(_registry_dir(registry_dir), db_url=db_url)
    try:
        reg.add_to_group(group, member)
        groups = reg.groups_of(member)
    finally:
        reg.close()
    _report({"member": member, "groups": groups}, as_json, f"{member} is in {', '.join(groups)}")
