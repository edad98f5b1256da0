"""``memfed model``: the base model a node hosts."""

from __future__ import annotations

import time
from pathlib import Path

import click

from memfed.cli.options import json_option, model_option
from memfed.cli.output import console, emit_json, progress_bar


@click.group()
def model() -> None:
    """The base model: build the embedded default, or inspect a local Hugging Face model."""


@model.command("init")
@model_option
@click.option("--rebuild", is_flag=True, help="Rebuild the embedded model even if it is cached.")
@json_option
def init(model_dir: Path | None, rebuild: bool, as_json: bool) -> None:
    """Build and cache the embedded default model (a small Llama taught our synthetic facts).

    The build is deterministic and happens once per machine; later calls return the cached folder. With
    --model DIR, check that DIR is a loadable local model instead. `--json` gives the folder as `path`.
    """
    from memfed.node.models import default_model_dir, resolve_model_dir

    t0 = time.perf_counter()
    if model_dir is None:
        with progress_bar("building the embedded model", quiet=as_json) as update:
            path = default_model_dir(progress=update, rebuild=rebuild)
    else:
        path = resolve_model_dir(model_dir)
    seconds = time.perf_counter() - t0
    build = _build_report(path)
    if as_json:
        emit_json({"path": str(path), "seconds": round(seconds, 3), "build": build})
        return
    console.print(f"model ready at [bold]{path}[/] ({seconds:.1f} s)")
    if build:
        for key, value in build.items():
            console.print(f"  {key}: {value}")


def _build_report(path: Path) -> dict:
    import json

    report = path / "memfed_build.json"
    return json.loads(report.read_text()) if report.is_file() else {}


@model.command("info")
@model_option
@json_option
def info(model_dir: Path | None, as_json: bool) -> None:
    """Load a model and print its fingerprint: what cubes made for it will name as their base model."""
    from memfed.cube.fingerprint import fingerprint_model
    from memfed.node.models import load_host_model, resolve_model_dir

    path = resolve_model_dir(model_dir)
    with progress_bar("loading model", quiet=as_json):
        host, _ = load_host_model(path)
    fp = fingerprint_model(host, name=path.name)
    data = {
        "path": str(path),
        "architecture": fp.architecture,
        "model_type": fp.model_type,
        "num_parameters": fp.num_parameters,
        "fingerprint_id": fp.fingerprint_id,
        "device": str(next(host.parameters()).device),
    }
    if as_json:
        emit_json(data)
    else:
        for key, value in data.items():
            console.print(f"{key}: {value}")
