"""``memfed cube``: import, export and inspect cubes in the local store."""

from __future__ import annotations

from pathlib import Path

import click

from memfed.cli.options import json_option, model_option, resolve_store, store_option
from memfed.cli.output import console, emit_json, print_cubes, progress_bar


@click.group()
def cube() -> None:
    """MemCubes: versioned parametric-memory modules (manifest + safetensors payload)."""


def _open_store(store_dir: Path | None):  # -> CubeStore (torch-free import path)
    from memfed.node.store import CubeStore

    return CubeStore(resolve_store(store_dir))


@cube.command("import-peft")
@click.argument("adapter_dir", type=click.Path(path_type=Path))
@model_option
@store_option
@click.option("--cube-id", help="Stable cube name. Default: the adapter folder's name.")
@click.option("--version", "version", default="1.0.0", show_default=True, help="Semantic version.")
@click.option("--owner", default="", help="Owner node id recorded in the manifest.")
@click.option("--tag", "tags", multiple=True, help="A tag (repeatable).")
@json_option
def import_peft_cmd(
    adapter_dir: Path,
    model_dir: Path | None,
    store_dir: Path | None,
    cube_id: str | None,
    version: str,
    owner: str,
    tags: tuple[str, ...],
    as_json: bool,
) -> None:
    """Turn a Hugging Face PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) into a cube.

    The adapter is checked against the base model (--model, default: the embedded model): every target
    module must exist with matching shapes, and the cube records the model's fingerprint so it is never
    applied to another model. Non-LoRA adapters and pickled weights are refused.
    """
    from memfed.cube.peft_io import check_supported, import_peft, read_adapter_config
    from memfed.node.models import load_host_model, resolve_model_dir

    # Check the folder before the model: a typo must not cost a model load (or the first build).
    check_supported(read_adapter_config(adapter_dir)[0])
    path = resolve_model_dir(model_dir)
    with progress_bar("loading base model", quiet=as_json):
        host, _ = load_host_model(path)
    new = import_peft(
        adapter_dir, host, cube_id=cube_id, version=version, owner=owner, tags=tags, model_name=path.name
    )
    with _open_store(store_dir) as store:
        store.put(new.manifest, new.payload)
    m = new.manifest
    result = {
        "cube_id": m.cube_id,
        "version": m.version,
        "digest": m.digest,
        "ref": new.ref,
        "size_bytes": m.payload.size_bytes,
        "targets": len(m.payload.lora.targets),
    }
    if as_json:
        emit_json(result)
    else:
        console.print(
            f"imported [bold]{new.ref}[/] ({len(m.payload.lora.targets)} LoRA modules, "
            f"{m.payload.size_bytes / 1e6:.2f} MB) digest {m.digest[:19]}…"
        )


@cube.command("export-peft")
@click.argument("ref")
@click.argument("out_dir", type=click.Path(path_type=Path))
@store_option
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists.")
@json_option
def export_peft_cmd(ref: str, out_dir: Path, store_dir: Path | None, force: bool, as_json: bool) -> None:
    """Write cube REF (NAME or NAME@VERSION) as a PEFT folder that PeftModel.from_pretrained loads."""
    from memfed.cube.manifest import parse_ref
    from memfed.cube.peft_io import export_peft

    cube_id, version = parse_ref(ref)
    with _open_store(store_dir) as store:
        found = store.get(cube_id, version)
    path = export_peft(found, out_dir, force=force)
    if as_json:
        emit_json({"path": str(path), "ref": found.ref, "digest": found.manifest.digest})
    else:
        console.print(f"exported [bold]{found.ref}[/] to {path}")


@cube.command("list")
@store_option
@json_option
def list_cmd(store_dir: Path | None, as_json: bool) -> None:
    """List the cube versions in the store (newest version of each name last)."""

    with _open_store(store_dir) as store:
        manifests = store.list()
    print_cubes(manifests, as_json=as_json, where="the store")


@cube.command("show")
@click.argument("ref")
@store_option
@json_option
def show_cmd(ref: str, store_dir: Path | None, as_json: bool) -> None:
    """Print the manifest of cube REF (NAME or NAME@VERSION; without a version, the newest)."""
    from memfed.cube.manifest import manifest_to_dict, manifest_to_json, parse_ref

    cube_id, version = parse_ref(ref)
    with _open_store(store_dir) as store:
        m = store.get_manifest(cube_id, version)
    if as_json:
        emit_json(manifest_to_dict(m))
    else:
        console.print_json(manifest_to_json(m))
