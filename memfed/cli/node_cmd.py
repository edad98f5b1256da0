"""``memfed node``: run a node (``serve``) and ask one how it is (``health``).

Also the options every command that talks to a node shares (``--node``, ``--timeout``, TLS files), so
``memfed module ...`` and ``memfed generate`` connect the same way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import gc
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from memfed.cli.observe_options import log_json_option, metrics_port_option
from memfed.cli.options import json_option, model_option, resolve_store, store_option
from memfed.cli.output import console, emit_json, err_console, progress_bar
from memfed.cli.serving import stop_on_signals

NODE_ENV = "MEMFED_NODE"
MiB = 1 << 20


# -- connecting to a node (shared by module_cmd and generate_cmd) ---------------------------------------


def node_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--node, --timeout and the client TLS files; the command receives ``node_conn`` (a dict)."""
    options = [
        click.option(
            "--node",
            "node_addr",
            metavar="HOST:PORT",
            default=None,
            help=f"The node to talk to. Default: ${NODE_ENV}, else 127.0.0.1:7711.",
        ),
        click.option(
            "--timeout",
            type=float,
            default=60.0,
            show_default=True,
            help="Seconds the node has to answer; past it the call fails with exit code 14.",
        ),
        click.option(
            "--tls-ca",
            type=click.Path(dir_okay=False, path_type=Path),
            default=None,
            help="CA certificate (PEM) of the node's certificate: connect with TLS. Default: plaintext.",
        ),
        click.option(
            "--tls-cert",
            "client_cert",
            type=click.Path(dir_okay=False, path_type=Path),
            default=None,
            help="This client's certificate (PEM), for a node that requires mutual TLS (with --tls-key).",
        ),
        click.option(
            "--tls-key",
            "client_key",
            type=click.Path(dir_okay=False, path_type=Path),
            default=None,
            help="This client's private key (PEM), with --tls-cert.",
        ),
    ]

    @functools.wraps(fn)
    def wrapper(
        *args: Any,
        node_addr: str | None,
        timeout: float,
        tls_ca: Path | None,
        client_cert: Path | None,
        client_key: Path | None,
        **kw: Any,
    ) -> Any:
        conn = {
            "address": node_addr,
            "timeout": timeout,
            "tls_ca": tls_ca,
            "client_cert": client_cert,
            "client_key": client_key,
        }
        return fn(*args, node_conn=conn, **kw)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def open_client(conn: dict[str, Any]):  # -> NodeClient (imported lazily: --help stays fast)
    from memfed.client import DEFAULT_ADDRESS, NodeClient
    from memfed.errors import InvalidArgumentError, NotFoundError

    address = conn["address"] or os.environ.get(NODE_ENV) or DEFAULT_ADDRESS
    credentials = None
    if conn["tls_ca"] or conn["client_cert"] or conn["client_key"]:
        import grpc

        if bool(conn["client_cert"]) != bool(conn["client_key"]):
            raise InvalidArgumentError("--tls-cert and --tls-key go together", hint="give both, or neither")
        try:
            ca = conn["tls_ca"].read_bytes() if conn["tls_ca"] else None
            cert = conn["client_cert"].read_bytes() if conn["client_cert"] else None
            key = conn["client_key"].read_bytes() if conn["client_key"] else None
        except FileNotFoundError as exc:
            raise NotFoundError(f"TLS file {exc.filename} does not exist") from None
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )
    return NodeClient(address, timeout=conn["timeout"], credentials=credentials)


# -- memfed node ----------------------------------------------------------------------------------------


@click.group()
def node() -> None:
    """Run a node: the host model, its cube store and the MIP NodeService (gRPC).

    \b
    memfed node serve --insecure            serve the embedded model on 127.0.0.1:7711
    memfed node health --node HOST:PORT     is it up, what model, which modules
    memfed module --help                    load, activate, merge, archive ... modules on a node
    memfed generate "a prompt"              generate on a node
    """


@node.command("serve")
@model_option
@store_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all).")
@click.option(
    "--port", type=int, default=7711, show_default=True, help="Port to listen on (0: any free one)."
)
@click.option(
    "--insecure",
    is_flag=True,
    help="Serve plaintext gRPC (no TLS, no client authentication). Required without --tls-cert: only for "
    "loopback or a network you trust.",
)
@click.option("--tls-cert", type=click.Path(dir_okay=False, path_type=Path), help="Server certificate (PEM).")
@click.option("--tls-key", type=click.Path(dir_okay=False, path_type=Path), help="Server private key (PEM).")
@click.option(
    "--tls-ca",
    type=click.Path(dir_okay=False, path_type=Path),
    help="CA certificate (PEM): clients must present a certificate it signed (mutual TLS).",
)
@click.option(
    "--node-id", default="", help="This node's id (in health answers and merge owners). Default: random."
)
@click.option(
    "--device-budget-mb",
    type=float,
    default=512,
    show_default=True,
    help="Memory for resident modules on the model's device; least recently used go first.",
)
@click.option(
    "--host-budget-mb",
    type=float,
    default=1024,
    show_default=True,
    help="Memory for decoded module copies in host RAM (an evicted module reloads without disk).",
)
@click.option(
    "--kv-cache-mb",
    type=float,
    default=256,
    show_default=True,
    help="Memory for conversation KV caches (activation memory); 0 turns reuse off.",
)
@click.option(
    "--plaintext",
    "plaintext_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="A plaintext memory database (SQLite) to retrieve from when no module serves a row.",
)
@click.option(
    "--max-batch-rows",
    type=int,
    default=64,
    show_default=True,
    help="Most rows in one generation batch (concurrent calls are batched together).",
)
@click.option(
    "--batch-wait-ms",
    type=float,
    default=5.0,
    show_default=True,
    help="How long a batch waits for more calls before it runs.",
)
@click.option(
    "--max-cube-mb", type=float, default=8192, show_default=True, help="Largest cube a push may send."
)
@click.option(
    "--tls",
    "tls_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Certificate folder from `memfed pki issue NAME`: mutual TLS (instead of --tls-cert/...).",
)
@click.option(
    "--registry",
    "registry_addr",
    default=None,
    metavar="HOST:PORT",
    help="The registry: register at start, seal for peers, sync (needs --tls and --identity).",
)
@click.option(
    "--registry-key",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The registry's public identity file: enforce capability tokens on every cube call.",
)
@click.option(
    "--identity",
    "identity_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="This node's identity folder (signing + HPKE keys) for sealed sync.",
)
@click.option(
    "--sync",
    "sync_cubes",
    multiple=True,
    metavar="CUBE_ID",
    help="Keep this cube at its newest catalog version (background loop; repeatable).",
)
@click.option("--sync-interval", type=float, default=5.0, show_default=True, help="Seconds between syncs.")
@click.option(
    "--operator",
    "operators",
    multiple=True,
    help="Certificate name allowed to run this node without tokens (besides its own).",
)
@click.option(
    "--auto-internalize",
    is_flag=True,
    help="Internalize hot, stable plaintext (--plaintext) into modules on its own, as `memfed memory "
    "proposals --apply` would (each gated by its held-out recall).",
)
@click.option(
    "--auto-interval",
    type=click.FloatRange(min=0.0, min_open=True),
    default=60.0,
    show_default=True,
    help="Seconds between automatic internalization checks.",
)
@click.option(
    "--auto-min-per-hour",
    type=click.FloatRange(min=0.0),
    default=10.0,
    show_default=True,
    help="Reads an hour that make a plaintext memory hot.",
)
@click.option(
    "--evolve",
    is_flag=True,
    help="Let modules improve from the feedback they get (Feedback RPC): past --evolve-threshold ratings "
    "from enough people, train, validate and publish (or discard) a next version; roll back one that "
    "does worse in use. Without it, feedback is only recorded.",
)
@click.option(
    "--evolve-threshold",
    type=click.IntRange(min=1),
    default=None,
    help="New ratings on a module before a candidate is trained (default: EvolveSettings.threshold).",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    help="Log detail on stderr.",
)
@metrics_port_option
@log_json_option
@json_option
def serve_cmd(
    model_dir: Path | None,
    store_dir: Path | None,
    host: str,
    port: int,
    insecure: bool,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_ca: Path | None,
    node_id: str,
    device_budget_mb: float,
    host_budget_mb: float,
    kv_cache_mb: float,
    plaintext_path: Path | None,
    max_batch_rows: int,
    batch_wait_ms: float,
    max_cube_mb: float,
    tls_dir: Path | None,
    registry_addr: str | None,
    registry_key: Path | None,
    identity_dir: Path | None,
    sync_cubes: tuple[str, ...],
    sync_interval: float,
    operators: tuple[str, ...],
    auto_internalize: bool,
    auto_interval: float,
    auto_min_per_hour: float,
    evolve: bool,
    evolve_threshold: int | None,
    log_level: str,
    metrics_port: int | None,
    log_json: bool,
    as_json: bool,
) -> None:
    """Serve the MIP NodeService until Ctrl-C (or SIGTERM): generation, modules, cubes, lifecycle.

    The node loads the model (--model, default: the embedded one) and opens the cube store (--store), then
    listens. It also serves the standard gRPC health service and server reflection, so
    `grpcurl -plaintext HOST:PORT list` shows memfed.mip.v1.NodeService.

    A plaintext port must be asked for with --insecure (and is logged as a warning); otherwise give
    --tls-cert and --tls-key, plus --tls-ca to require client certificates. With --json, one JSON document
    {"address", "port", "node_id", "model", "store"} is printed once the node listens.
    """
    from memfed.errors import InvalidArgumentError
    from memfed.node.service import Node, NodeServer, tls_credentials

    if bool(tls_cert) != bool(tls_key):
        raise InvalidArgumentError("--tls-cert and --tls-key go together", hint="give both, or neither")
    if tls_ca and not tls_cert:
        raise InvalidArgumentError("--tls-ca (mutual TLS) needs --tls-cert and --tls-key")
    if tls_dir is not None:
        tls_cert, tls_key, tls_ca = tls_dir / "cert.pem", tls_dir / "key.pem", tls_dir / "ca.pem"
        if not node_id:
            from memfed.registry.tls import TlsFiles

            node_id = TlsFiles.from_dir(tls_dir).name  # the certificate names the node
    from memfed.cli.node_network import NodeNetwork, check_options

    check_options(tls_dir, registry_addr, registry_key, identity_dir, sync_cubes)
    if tls_cert and insecure:
        raise InvalidArgumentError("--insecure and --tls-cert contradict each other", hint="pick one")
    if not tls_cert and not insecure:
        raise InvalidArgumentError(
            "the node would serve without TLS",
            hint="pass --tls-cert and --tls-key, or --insecure for a plaintext port on a trusted network",
        )
    if auto_internalize and plaintext_path is None:
        raise InvalidArgumentError(
            "--auto-internalize reads the node's plaintext memory", hint="add --plaintext DB"
        )
    for name, value in (("--device-budget-mb", device_budget_mb), ("--max-batch-rows", max_batch_rows)):
        if value <= 0:
            raise InvalidArgumentError(f"{name} must be positive, not {value}")
    credentials = tls_credentials(tls_cert, tls_key, tls_ca) if tls_cert and tls_key else None
    from memfed.observability import configure_logging

    configure_logging(log_level, json_lines=log_json)
    store_path = resolve_store(store_dir)
    with progress_bar("loading the model", quiet=as_json or log_json):
        the_node = Node.open(
            model_dir,
            store_path,
            node_id=node_id,
            plaintext_path=plaintext_path,
            device_budget_bytes=int(device_budget_mb * MiB),
            host_budget_bytes=int(host_budget_mb * MiB),
            kv_cache_bytes=int(kv_cache_mb * MiB),
        )
    net = NodeNetwork.configure(
        the_node, store_path, tls_dir=tls_dir, registry_addr=registry_addr, registry_key=registry_key,
        identity_dir=identity_dir, sync_cubes=sync_cubes, sync_interval=sync_interval, operators=operators,
    )  # fmt: skip
    from memfed.node.evolve.settings import EvolveSettings
    from memfed.node.service.feedback import FeedbackIntake

    evolve_settings = EvolveSettings()
    if evolve_threshold is not None:
        evolve_settings = dataclasses.replace(evolve_settings, threshold=evolve_threshold)
    intake = FeedbackIntake(the_node, settings=evolve_settings, evolve=evolve)
    server = NodeServer(
        the_node,
        host=host,
        port=port,
        insecure=insecure,
        credentials=credentials,
        max_batch_rows=max_batch_rows,
        batch_wait_ms=batch_wait_ms,
        max_cube_bytes=int(max_cube_mb * MiB),
        authorizer=net.authorizer,
        sealer=net.sealer,
        metrics_port=metrics_port,
        feedback=intake,
    )

    async def run() -> None:
        stop = stop_on_signals()
        await server.start()
        await net.start(server.address, stop)
        auto_task = None
        if auto_internalize:
            from memfed.node.conversion.triggers import AutoInternalizeSettings
            from memfed.node.service.auto import AutoInternalizeLoop

            settings = AutoInternalizeSettings(enabled=True, min_per_hour=auto_min_per_hour)
            auto_task = asyncio.create_task(AutoInternalizeLoop(server, settings, auto_interval).run(stop))
        info = {
            "address": server.address,
            "port": server.port,
            "node_id": the_node.node_id,
            "model": the_node.model_name,
            "store": str(store_path),
            "tls": credentials is not None,
        }
        if server.metrics_port is not None:
            info["metrics_port"] = server.metrics_port  # the bound one, when --metrics-port 0
        if as_json:
            emit_json(info)
        else:
            console.print(
                f"node [bold]{the_node.node_id}[/] serving [bold]{server.address}[/] "
                f"({'TLS' if credentials else 'PLAINTEXT'}; model {the_node.model_name}, "
                f"store {store_path}); Ctrl-C stops it"
            )
        await stop.wait()
        if log_json:  # stderr carries JSON lines only
            logging.getLogger("memfed.node.service").info("stopping: finishing running calls")
        else:
            err_console.print("stopping: finishing running calls")
        if auto_task is not None:
            await auto_task  # returns at once unless a tick is running: then after it
        await server.stop(grace=5.0)

    # What exists now (the model, torch's and transformers' objects) lives as long as the process: out of
    # the cyclic GC's sight, whose full collections otherwise walked it all again while serving (a
    # quarter of the CPU a sealed 64 MiB transfer cost the holder, `memfed bench sync`).
    gc.collect()
    gc.freeze()
    try:
        asyncio.run(run())
    finally:
        intake.close()
        the_node.close()


@node.command("health")
@node_options
@json_option
def health_cmd(node_conn: dict[str, Any], as_json: bool) -> None:
    """Ask a node whether it serves, which model it hosts and which modules it has loaded and active."""
    with open_client(node_conn) as client:
        h = client.health()
    data = h.to_dict()
    data["address"] = client.address
    if as_json:
        emit_json(data)
        return
    console.print(
        f"node [bold]{h.node_id}[/] at {client.address}: memfed {h.memfed_version}, model "
        f"{h.base_model.name or h.base_model.architecture} ({h.base_model.fingerprint_id}) on {h.device}"
    )
    console.print(
        f"  modules: {h.resident_modules} resident ({h.device_bytes_used / MiB:.1f} of "
        f"{h.device_budget_bytes / MiB:.0f} MiB), active: {', '.join(h.active_modules) or 'none'}; "
        f"{h.queued_rows} rows queued"
    )
