"""``memfed module``: manage the modules (cubes) on a running node over MIP.

Everything here talks to a node (``--node HOST:PORT``); ``memfed cube`` works on a local store instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from memfed.cli.node_cmd import node_options, open_client
from memfed.cli.options import json_option, resolve_store, store_option
from memfed.cli.output import console, emit_json, print_cubes

REF_HELP = "REF is NAME (its current version) or NAME@VERSION."


@click.group()
def module() -> None:
    """Modules on a node: load, activate, evict, merge, archive, restore, roll back.

    \b
    A module is a cube (LoRA or adapter) the node's model can run. Its path through a node:
      push        copy a cube from the local store to the node
      load        make it resident on the model's device (ready, not yet used by default)
      activate    every request without its own modules runs it
      evict       free its device memory (a host copy is kept unless --tier host)
      archive     move it to cold storage; restore brings it back ("time machine")
      rollback    make an earlier version current again
      merge       combine modules into a new one whose version chain names them
      bind        route requests for a task to a module
    Every command takes --node HOST:PORT (default $MEMFED_NODE or 127.0.0.1:7711) and --json.
    """


def _ref_dict(ref: str) -> dict[str, str]:
    cube_id, _, version = ref.partition("@")
    return {"ref": ref, "cube_id": cube_id, "version": version}


@module.command("list")
@click.option("--prefix", default="", help="Only cubes whose id starts with this.")
@click.option("--state", "states", multiple=True, help="Only cubes in this lifecycle state (repeatable).")
@node_options
@json_option
def list_cmd(prefix: str, states: tuple[str, ...], node_conn: dict[str, Any], as_json: bool) -> None:
    """List the cube versions a node holds, with their lifecycle state (expired ones only with --state)."""

    with open_client(node_conn) as client:
        manifests = client.list_cubes(prefix, states)
    print_cubes(manifests, as_json=as_json, where="the node")


@module.command("show")
@click.argument("ref")
@node_options
@json_option
def show_cmd(ref: str, node_conn: dict[str, Any], as_json: bool) -> None:
    """Print the manifest of module REF on the node. REF is NAME or NAME@VERSION."""
    from memfed.cube.manifest import manifest_to_dict, manifest_to_json

    with open_client(node_conn) as client:
        m = client.show(ref)
    if as_json:
        emit_json(manifest_to_dict(m))
    else:
        console.print_json(manifest_to_json(m))


@module.command("push")
@click.argument("ref")
@store_option
@node_options
@json_option
def push_cmd(ref: str, store_dir: Path | None, node_conn: dict[str, Any], as_json: bool) -> None:
    """Copy cube REF from the local store (--store) to the node, as a chunked stream.

    The node stores it only after the whole payload arrived and matched its digest, and only if it fits
    the node's model (a cube for another base model, a wrong rank or target layer, NaN/Inf values are
    refused). An interrupted push leaves nothing on the node.
    """
    from memfed.cube.manifest import parse_ref
    from memfed.node.store import CubeStore

    cube_id, version = parse_ref(ref)
    with CubeStore(resolve_store(store_dir)) as store:
        cube = store.get(cube_id, version)
    with open_client(node_conn) as client:
        result = client.put_cube(cube, timeout=None)
    if as_json:
        emit_json(
            {
                **_ref_dict(result.ref),
                "already_present": result.already_present,
                "digest": cube.manifest.digest,
            }
        )
    else:
        note = " (it had it already)" if result.already_present else ""
        console.print(f"pushed [bold]{result.ref}[/] to {client.address}{note}")


@module.command("pull")
@click.argument("ref")
@store_option
@node_options
@json_option
def pull_cmd(ref: str, store_dir: Path | None, node_conn: dict[str, Any], as_json: bool) -> None:
    """Copy cube REF from the node into the local store (--store), verified against its digest."""
    from memfed.node.store import CubeStore

    with open_client(node_conn) as client:
        cube = client.get_cube(ref, timeout=None)
    with CubeStore(resolve_store(store_dir)) as store:
        store.put(cube.manifest, cube.payload)
    if as_json:
        emit_json({**_ref_dict(cube.ref), "digest": cube.manifest.digest, "size_bytes": len(cube.payload)})
    else:
        console.print(f"pulled [bold]{cube.ref}[/] ({len(cube.payload) / 1e6:.2f} MB) into the local store")


@module.command("load")
@click.argument("ref")
@click.option("--pin", is_flag=True, help="Never evict it to make room (until evicted explicitly).")
@node_options
@json_option
def load_cmd(ref: str, pin: bool, node_conn: dict[str, Any], as_json: bool) -> None:
    """Make module REF resident on the node's device, without activating it. REF is NAME or NAME@VERSION.

    Less recently used, lower priority modules are evicted to make room; a module larger than the whole
    device budget is refused (exit code 13).
    """
    with open_client(node_conn) as client:
        r = client.load(ref, pin=pin)
    data = {
        **_ref_dict(r.ref),
        "size_bytes": r.size_bytes,
        "seconds": r.seconds,
        "device_bytes_used": r.device_bytes_used,
        "device_budget_bytes": r.device_budget_bytes,
    }
    if as_json:
        emit_json(data)
    else:
        console.print(
            f"loaded [bold]{r.ref}[/] ({r.size_bytes / 1e6:.2f} MB) in {r.seconds * 1e3:.1f} ms; device "
            f"{r.device_bytes_used / 1e6:.1f} of {r.device_budget_bytes / 1e6:.0f} MB used"
        )


@module.command("evict")
@click.argument("ref")
@click.option(
    "--tier",
    type=click.Choice(["device", "host"]),
    default="device",
    show_default=True,
    help="device: free device memory, keep a decoded copy in host RAM; host: drop both copies.",
)
@node_options
@json_option
def evict_cmd(ref: str, tier: str, node_conn: dict[str, Any], as_json: bool) -> None:
    """Move module REF down a memory tier on the node (it stays in the store). REF is NAME or NAME@VERSION."""
    with open_client(node_conn) as client:
        now_in = client.evict(ref, tier=tier)
    if as_json:
        emit_json({"ref": ref, "now_in": now_in})
    else:
        console.print(f"evicted [bold]{ref}[/]: now in {now_in}")


@module.command("activate")
@click.argument("ref")
@click.option("--pin", is_flag=True, help="Also pin it: never evicted to make room.")
@node_options
@json_option
def activate_cmd(ref: str, pin: bool, node_conn: dict[str, Any], as_json: bool) -> None:
    """Activate module REF: every request that names no modules runs it (with the other active ones).

    Another version of the same module gives way. REF is NAME or NAME@VERSION.
    """
    with open_client(node_conn) as client:
        r = client.activate(ref, pin=pin)
    if as_json:
        emit_json({**_ref_dict(r.ref), "state": r.state, "seconds": r.seconds, "active": list(r.active)})
    else:
        console.print(
            f"activated [bold]{r.ref}[/] in {r.seconds * 1e3:.1f} ms; active: {', '.join(r.active)}"
        )


@module.command("deactivate")
@click.argument("ref", required=False)
@node_options
@json_option
def deactivate_cmd(ref: str | None, node_conn: dict[str, Any], as_json: bool) -> None:
    """Deactivate module REF (it stays loaded), or every module when REF is left out."""
    with open_client(node_conn) as client:
        active = client.deactivate(ref)
    if as_json:
        emit_json({"ref": ref or "", "active": list(active)})
    else:
        console.print(f"deactivated {ref or 'all modules'}; active: {', '.join(active) or 'none'}")


@module.command("bind")
@click.argument("task")
@click.argument("ref", required=False)
@click.option("--unbind", is_flag=True, help="Remove TASK's binding instead.")
@node_options
@json_option
def bind_cmd(task: str, ref: str | None, unbind: bool, node_conn: dict[str, Any], as_json: bool) -> None:
    """Route requests for TASK to module REF: `memfed generate --task TASK ...` then runs it.

    REF without a version follows the module's current version. Example:
    memfed module bind contract_review legal_expert
    """
    from memfed.errors import InvalidArgumentError

    if unbind == bool(ref):
        raise InvalidArgumentError("give a module REF to bind, or --unbind (not both)")
    with open_client(node_conn) as client:
        bindings = client.bind_task(task, None if unbind else ref)
    if as_json:
        emit_json({"task": task, "module": "" if unbind else ref, "bindings": list(bindings)})
    else:
        what = "unbound" if unbind else f"bound to [bold]{ref}[/]"
        console.print(f"task [bold]{task}[/] {what}; bindings: {', '.join(bindings) or 'none'}")


def _transition(verb: str, target: str) -> Any:
    @click.argument("ref")
    @click.option("--reason", default="", help="Why (recorded in the lifecycle history).")
    @node_options
    @json_option
    def cmd(ref: str, reason: str, node_conn: dict[str, Any], as_json: bool) -> None:
        with open_client(node_conn) as client:
            r = client.transition(ref, target, reason=reason)
        if as_json:
            emit_json({"ref": ref, "from": r.from_state, "to": r.to_state})
        else:
            console.print(f"{verb} [bold]{ref}[/]: {r.from_state} → {r.to_state}")

    return cmd


_ARCHIVE_HELP = """Archive module REF: its payload moves to cold storage; it cannot be loaded until restored.

It is evicted from the node's memory first. REF is NAME or NAME@VERSION."""
_RESTORE_HELP = """Restore an archived or expired module REF ("time machine").

Its payload comes back from cold storage, verified against its digest, and it is ACTIVATED (loadable)
again. REF is NAME@VERSION."""
_EXPIRE_HELP = """Expire module REF: hidden, refused, and purged after the retention period (restorable until
then). REF is NAME or NAME@VERSION."""
module.command("archive", help=_ARCHIVE_HELP)(_transition("archived", "archived"))
module.command("restore", help=_RESTORE_HELP)(_transition("restored", "activated"))
module.command("expire", help=_EXPIRE_HELP)(_transition("expired", "expired"))


@module.command("rollback")
@click.argument("cube_id")
@click.option("--to", "to_version", default="", help="The version to make current. Default: the one before.")
@click.option("--reason", default="", help="Why (recorded in the lifecycle history).")
@node_options
@json_option
def rollback_cmd(
    cube_id: str, to_version: str, reason: str, node_conn: dict[str, Any], as_json: bool
) -> None:
    """Make an earlier version of CUBE_ID current again; the newer versions are archived.

    Rolling forward later is a `memfed module restore CUBE_ID@NEWER` (or a rollback to it).
    """
    with open_client(node_conn) as client:
        r = client.rollback(cube_id, to_version=to_version, reason=reason)
    if as_json:
        emit_json({"cube_id": cube_id, "previous": r.previous, "current": r.current})
    else:
        console.print(f"rolled back [bold]{cube_id}[/]: {r.previous} → current {r.current}")


@module.command("merge")
@click.argument("sources", nargs=-1, required=True)
@click.option("--into", "cube_id", required=True, help="The merged module's cube id.")
@click.option("--version", default="1.0.0", show_default=True, help="The merged module's version.")
@click.option(
    "--method",
    type=click.Choice(["cat", "svd", "linear", "ties", "dare_linear", "dare_ties"]),
    default="cat",
    show_default=True,
    help="cat: exact sum of the modules' deltas (ranks add up); svd: the same, cut to --rank; "
    "linear/ties/dare_*: combine factors (only for modules trained from one initialisation).",
)
@click.option(
    "--weight", "weights", type=float, multiple=True, help="One per source, in order. Default: 1.0 each."
)
@click.option("--density", type=float, default=0.0, help="ties/dare: fraction of entries kept (0 < d <= 1).")
@click.option(
    "--rank", type=int, default=0, help="svd: rank of the result. Default: the largest source rank."
)
@click.option("--seed", type=int, default=0, help="dare: seed of the random drop.")
@node_options
@json_option
def merge_cmd(
    sources: tuple[str, ...],
    cube_id: str,
    version: str,
    method: str,
    weights: tuple[float, ...],
    density: float,
    rank: int,
    seed: int,
    node_conn: dict[str, Any],
    as_json: bool,
) -> None:
    """Merge LoRA modules SOURCES (two or more REFs) on the node into a new module --into.

    The result is stored in MERGED, its version chain naming its parents; the parents stay as they are.
    Example: memfed module merge legal@1.0.0 tax@2.1.0 --into legal_tax --weight 1 --weight 0.5
    """
    with open_client(node_conn) as client:
        m = client.merge(
            sources,
            cube_id=cube_id,
            version=version,
            method=method,
            weights=weights or None,
            density=density,
            rank=rank,
            seed=seed,
            timeout=None,
        )
    ref = f"{m.cube_id}@{m.version}"
    rank_of = m.payload.lora.rank
    if as_json:
        emit_json(
            {
                **_ref_dict(ref),
                "digest": m.digest,
                "method": method,
                "rank": rank_of,
                "parents": list(sources),
                "size_bytes": m.payload.size_bytes,
            }
        )
    else:
        console.print(f"merged {', '.join(sources)} into [bold]{ref}[/] ({method}, rank {rank_of})")
