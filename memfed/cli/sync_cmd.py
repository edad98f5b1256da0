"""``memfed sync``: pull the newest versions of cubes from the nodes that hold them (sealed, resumable)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from memfed.cli.options import json_option, model_option, resolve_store, store_option
from memfed.cli.output import console, emit_json
from memfed.cli.registry_cmd import registry_client_options


def sync_partial_dir(store_path: Path) -> Path:
    """Where unfinished transfers wait: next to the store, never inside it."""
    return store_path.parent / f"{store_path.name}-sync"


@click.command("sync")
@click.argument("cube_ids", nargs=-1, required=True)
@registry_client_options
@click.option("--identity", "identity_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="This node's identity folder: cubes are sealed for its HPKE key.")  # fmt: skip
@model_option
@store_option
@click.option("--chunk-kb", type=int, default=0, help="Sealed chunk size to ask for (0: the holder's 1 MiB).")
@click.option("--throttle-ms", type=float, default=0.0, hidden=True, help="Pause per chunk (tests).")
@json_option
def sync_cmd(
    cube_ids: tuple[str, ...], reg: Callable[[], Any], identity_dir: Path, model_dir: Path | None,
    store_dir: Path | None, chunk_kb: int, throttle_ms: float, as_json: bool,
) -> None:  # fmt: skip
    """Bring CUBE_IDS to their newest catalog versions in the local store.

    Needs --tls (this node's certificate), --registry-key (to verify the catalog) and a grant of
    `export` on each cube. An interrupted transfer resumes from its last verified chunk when run again.
    """
    from memfed.crypto.identity import load_identity
    from memfed.cube.fingerprint import fingerprint_model
    from memfed.errors import InvalidArgumentError
    from memfed.node.models import load_host_model, resolve_model_dir
    from memfed.node.service.sync import Syncer
    from memfed.node.store import CubeStore

    client = reg()
    if client.tls is None or client.registry_key is None:
        raise InvalidArgumentError(
            "sync needs --tls DIR and --registry-key FILE", hint="both come from the network"
        )
    model, _ = load_host_model(resolve_model_dir(model_dir))
    store_path = resolve_store(store_dir)
    fp: list[Any] = []

    def host_fp() -> Any:
        if not fp:
            fp.append(fingerprint_model(model))
        return fp[0]

    results = []
    with CubeStore(store_path) as store, client:
        syncer = Syncer(
            store=store, identity=load_identity(identity_dir), registry=client, tls=client.tls,
            node_id=client.tls.name, host_fingerprint=host_fp, partial_dir=sync_partial_dir(store_path),
            chunk_delay_s=throttle_ms / 1e3, chunk_size=chunk_kb << 10,
        )  # fmt: skip
        for cube_id in cube_ids:
            results.append(syncer.sync(cube_id).to_dict())
    if as_json:
        emit_json({"results": results})
    else:
        for r in results:
            how = f"from {r['holder']}, {r['bytes']:,} bytes" if r["status"] == "synced" else "already here"
            console.print(f"{r['cube_id']}@{r['version']}: {r['status']} ({how})")
