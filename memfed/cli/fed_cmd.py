"""``memfed fed``: federated training of a shared LoRA cube on Flower (deployment or simulation engine)."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import click

from memfed.cli.options import json_option
from memfed.cli.output import console, emit_json
from memfed.errors import InvalidArgumentError

AGGREGATIONS = ("stack", "svd", "fedit")


@click.group()
def fed() -> None:
    """Train one shared LoRA cube across nodes; only adapter updates travel.

    \b
    How a federation runs (with the registry, the usual deployment):
      memfed fed init CUBE --store S --registry-dir R --identity AGG   1.0.0, AGG becomes its admin
      memfed registry grant ...                 grant nodes 'use' on CUBE (the registry decides)
      memfed fed serve CUBE --store S --registry-dir R --identity AGG --tls-dir CA
      memfed fed join --superlink ADDR --ca CA.pem --identity DIR --data PATH   on every node
    Without a registry: --grants FILE instead of --registry-dir (memfed fed grant writes it).
      memfed fed simulate --nodes 50            the same apps on Flower's simulation engine (Ray)

    Aggregation is exact: 'stack' (factors stacked, ranks add; default) or 'svd' (re-factored to a rank,
    truncation error reported); 'fedit' (A and B averaged separately) is the inexact baseline.
    --dp-clip/--dp-noise: client-side clipping + Gaussian noise of each update (local DP on the factors).
    """


def _registry_options(f):  # type: ignore[no-untyped-def]
    """Where admission and versions live when a registry runs next to the server."""
    options = [
        click.option(
            "--registry-dir",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="Registry folder: its access control admits nodes ('use' on the cube) and its "
            "catalog records each version. Instead of --grants.",
        ),
        click.option(
            "--registry-db",
            default=None,
            metavar="URL",
            help="Registry database URL (default: SQLite in --registry-dir).",
        ),
        click.option(
            "--identity",
            "aggregator_identity",
            type=click.Path(path_type=Path),
            default=None,
            help="With --registry-dir: this server's registered node identity; it signs and "
            "holds each version.",
        ),
        click.option("--node-id", default="", help="Its registered node id (default: the identity's name)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@fed.command("init")
@click.argument("cube_id")
@click.option("--store", type=click.Path(path_type=Path), required=True, help="Cube store to publish to.")
@click.option("--model", default=None, help="Base model folder (default: the embedded model).")
@click.option("--modules", default="q_proj,v_proj", show_default=True, help="Layer names to adapt.")
@_registry_options
@json_option
def init_cmd(
    cube_id: str,
    store: Path,
    model: str | None,
    modules: str,
    registry_dir: Path | None,
    registry_db: str | None,
    aggregator_identity: Path | None,
    node_id: str,
    as_json: bool,
) -> None:
    """Create CUBE_ID@1.0.0: a zero LoRA every round builds on.

    With --registry-dir it is also recorded in the registry's catalog, published by the --identity node,
    which so becomes the cube's admin (it grants 'use' to the nodes: memfed registry grant).
    """
    from memfed.fed.authority import Authority, LocalAuthority
    from memfed.fed.shared import new_shared_cube
    from memfed.node.models import load_host_model

    authority: Authority
    if registry_dir is not None:
        from memfed.fed.registry_authority import RegistryAuthority

        if aggregator_identity is None:
            raise InvalidArgumentError("--registry-dir needs --identity (the aggregator's node identity)")
        authority = RegistryAuthority.open(
            registry_dir, store, aggregator_identity, node_id=node_id, db_url=registry_db
        )
    else:
        authority = LocalAuthority(store, store / "grants.json")
    lm, _ = load_host_model(model, device="cpu")
    cube = new_shared_cube(lm, cube_id, [m.strip() for m in modules.split(",") if m.strip()])
    try:
        m = authority.publish(cube)
    finally:
        authority.close()
    if as_json:
        emit_json({"ref": f"{m.cube_id}@{m.version}", "digest": m.digest})
    else:
        console.print(f"created {m.cube_id}@{m.version}")


@fed.command("grant")
@click.argument("cube_id")
@click.option("--grants", type=click.Path(path_type=Path), required=True, help="Grants file to update.")
@click.option("--identity", "identities", multiple=True, required=True, type=click.Path(path_type=Path),
              help="A node's identity folder or its identity.pub.json (repeatable).")  # fmt: skip
def grant_cmd(cube_id: str, grants: Path, identities: tuple[Path, ...]) -> None:
    """Grant 'use' on CUBE_ID to nodes, registering their signing keys, in a local grants file.

    For a federation without a registry; with one, grant in the registry (memfed registry grant).
    """
    from memfed.crypto.identity import load_public_identity
    from memfed.fed.authority import write_grants

    data = json.loads(grants.read_text()) if grants.exists() else {"principals": {}, "grants": {}}
    principals = {k: bytes.fromhex(v) for k, v in data.get("principals", {}).items()}
    table = data.get("grants", {})
    for path in identities:
        pub = load_public_identity(path / "identity.pub.json" if path.is_dir() else path)
        principals[pub.name] = pub.signing_key.public_bytes_raw()
        users = table.setdefault(cube_id, {}).setdefault("use", [])
        if pub.name not in users:
            users.append(pub.name)
        console.print(f"granted use on {cube_id} to {pub.name}")
    write_grants(grants, principals, table)


def _settings_options(f):  # type: ignore[no-untyped-def]
    options = [
        click.option("--rounds", default=3, show_default=True, help="Federated rounds."),
        click.option("--aggregation", type=click.Choice(AGGREGATIONS), default="stack", show_default=True),
        click.option("--svd-rank", default=0, help="Rank for --aggregation svd (0: the cube's rank)."),
        click.option("--rank", default=4, show_default=True, help="Rank of each node's update."),
        click.option("--steps", default=20, show_default=True, help="Local training steps per round."),
        click.option(
            "--dp-clip",
            default=0.0,
            show_default=True,
            help="Client-side DP: clip each update's factors to this L2 norm (0: off).",
        ),
        click.option(
            "--dp-noise",
            default=0.0,
            show_default=True,
            help="Client-side DP: Gaussian noise multiplier (std = dp-noise x dp-clip).",
        ),
        click.option(
            "--min-contributors",
            default=1,
            show_default=True,
            help="Publish a round only with at least this many accepted updates.",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@fed.command("serve")
@click.argument("cube_id")
@click.option("--store", type=click.Path(path_type=Path), required=True, help="The shared cube's store.")
@click.option("--grants", type=click.Path(path_type=Path), default=None,
              help="A grants file deciding who may take part (without a registry).")  # fmt: skip
@_registry_options
@click.option("--tls-dir", type=click.Path(path_type=Path), required=True,
              help="Network CA folder (created if missing); issues the SuperLink's certificate.")  # fmt: skip
@click.option("--port", default=9093, show_default=True, help="SuperLink port (nodes connect here).")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address the SuperLink listens on (0.0.0.0: every interface, as in a container).",
)
@click.option(
    "--tls-host",
    "tls_hosts",
    multiple=True,
    help="A name or IP nodes reach the SuperLink by, put in its certificate (repeatable).",
)
@click.option("--min-nodes", default=2, show_default=True, help="Wait for this many nodes each round.")
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("fed-server"), show_default=True)
@_settings_options
@json_option
def serve_cmd(cube_id: str, store: Path, grants: Path | None, registry_dir: Path | None,
              registry_db: str | None, aggregator_identity: Path | None, node_id: str, tls_dir: Path,
              port: int, host: str, tls_hosts: tuple[str, ...], min_nodes: int, workdir: Path,
              as_json: bool, **kw: object) -> None:  # fmt: skip
    """Run the SuperLink with TLS and the rounds for CUBE_ID; print each round's report.

    Admission and publishing: --registry-dir (the registry's grants and catalog; the usual deployment)
    or --grants (a local grants file).
    """
    from memfed.fed import deploy
    from memfed.fed.server_app import ServerSettings, build_authority

    if (grants is None) == (registry_dir is None):
        raise InvalidArgumentError(
            "say who may take part: give exactly one of --registry-dir and --grants",
            hint="--registry-dir DIR --identity AGGREGATOR_ID_DIR, or --grants FILE (memfed fed grant)",
        )
    workdir = workdir.resolve()
    report = workdir / "report.json"
    report.unlink(missing_ok=True)

    def resolved(p: Path | None) -> str:
        return str(p.resolve()) if p is not None else ""

    settings = ServerSettings(cube_id=cube_id, store=str(store.resolve()), grants=resolved(grants),
                              registry_dir=resolved(registry_dir), registry_db=registry_db or "",
                              identity=resolved(aggregator_identity), node_id=node_id,
                              min_nodes=min_nodes, report=str(report), **kw)  # type: ignore[arg-type]  # fmt: skip
    authority = build_authority(settings)  # fail here, not in the ServerApp, on a bad setup
    try:
        authority.current(cube_id)
    finally:
        authority.close()
    tls = deploy.make_tls(tls_dir, tls_hosts)
    link, address = deploy.start_superlink(workdir, tls, port=port, host=host)
    try:
        reach = f"{tls_hosts[0]}:{port}" if tls_hosts else address
        console.print(
            f"SuperLink on {host}:{port} (TLS, CA {tls.ca}); nodes: memfed fed join --superlink {reach}"
        )
        deploy.submit_run(
            deploy.write_app(workdir / "app", settings.as_run_config()), address, tls.ca, workdir
        )
        while not report.exists() and link.poll() is None:
            time.sleep(0.5)
    finally:
        deploy.stop(link)
    rounds = json.loads(report.read_text()) if report.exists() else []
    if as_json:
        emit_json({"cube_id": cube_id, "rounds": rounds})
    for r in rounds if not as_json else []:
        console.print(
            f"round {r['server_round']}: {r['version']} from {r['contributors']}, rejected {r['rejected']}"
        )


@fed.command("join")
@click.option("--superlink", required=True, help="SuperLink address, e.g. registry.example:9093.")
@click.option("--ca", type=click.Path(path_type=Path, exists=True), required=True, help="Network CA (PEM).")
@click.option("--identity", type=click.Path(path_type=Path, exists=True), required=True)
@click.option("--data", type=click.Path(path_type=Path, exists=True), required=True,
              help="Local data: plaintext memory .db, .md/.txt folder or file; it stays here.")  # fmt: skip
@click.option("--model", default="", help="Base model folder (default: the embedded model).")
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("fed-node"), show_default=True)
@click.option("--dp-clip", default=0.0, help="This node's DP floor: clip its updates at most to this norm.")
@click.option("--dp-noise", default=0.0, help="This node's DP floor: at least this noise multiplier.")
def join_cmd(superlink: str, ca: Path, identity: Path, data: Path, model: str, workdir: Path,
             dp_clip: float, dp_noise: float) -> None:  # fmt: skip
    """Run this node's SuperNode until interrupted; it trains the shared cube in each round it joins.

    With --dp-clip/--dp-noise the node clips and noises its updates at least this much, whatever the
    server asks (the stricter of both applies; see memfed.fed.privacy for what the guarantee covers).
    """
    from memfed.fed import deploy
    from memfed.fed.privacy import DpSettings

    DpSettings(dp_clip, dp_noise)  # refuse a bad setting before starting anything
    config = {"identity": str(identity.resolve()), "data": str(data.resolve()), "model": model}
    if dp_clip > 0:
        config |= {"dp-clip": repr(dp_clip), "dp-noise": repr(dp_noise)}
    node = deploy.start_supernode(superlink, ca, config, workdir.resolve())
    console.print(f"SuperNode connected to {superlink}; Ctrl-C to leave")
    try:
        node.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        deploy.stop_all(node.procs)


@fed.command("simulate")
@click.option("--nodes", default=10, show_default=True, help="Virtual nodes (each with its own data slice).")
@click.option("--model", default="", help="Base model folder (default: the embedded model).")
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("fed-sim"), show_default=True)
@_settings_options
@json_option
def simulate_cmd(nodes: int, model: str, workdir: Path, as_json: bool, **kw: object) -> None:
    """Run the same apps on Flower's simulation engine (Ray) with NODES synthetic nodes."""
    from memfed.fed.simulate import prepare, simulate

    workdir = workdir.resolve()
    settings = replace(prepare(workdir, nodes, model=model), **kw)  # type: ignore[arg-type]
    result = simulate(workdir, settings, nodes, model=model)
    if as_json:
        emit_json(result)
        return
    for r in result["rounds"]:
        console.print(f"round {r['server_round']}: {r['version']} from {len(r['contributors'])} nodes")
    console.print(f"{nodes} nodes, {len(result['rounds'])} rounds in {result['seconds']:.1f} s")
