"""``memfed steer``: activation steering vectors as cubes, and their distillation into modules.

extract (contrast pairs → a steering cube), eval (the behaviour with and without it), ask (generate with
it; counts a use), distill (a LoRA module that reproduces it, tagged behavior_module) and proposals
(steering cubes used often enough to distill; --apply distills them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from memfed.cli.options import json_option, model_option, resolve_store, store_option
from memfed.cli.output import console, emit_json, progress_bar

pairs_option = click.option(
    "--pairs",
    "pairs_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help='Contrast pairs, JSONL: {"prompt", "positive", "negative"} per line. Default: the shipped '
    "context-faithfulness pairs of the embedded model (train split; eval uses the held-out split).",
)


def _pairs(pairs_file: Path | None, split: str) -> list[Any]:
    from memfed.node.conversion.steering import context_pairs, load_pairs

    return load_pairs(pairs_file) if pairs_file is not None else context_pairs(split)


def _split(pairs_file: Path | None) -> tuple[list[Any], list[Any]]:
    """(train, held-out) pairs: the shipped splits, or every third pair of a file held out."""
    from memfed.node.conversion.steering import context_pairs, load_pairs

    if pairs_file is None:
        return context_pairs("train"), context_pairs("heldout")
    pairs = load_pairs(pairs_file)
    train, heldout = [p for i, p in enumerate(pairs) if i % 3 != 2], pairs[2::3]
    return train, heldout or train


def _model(model_dir: Path | None, quiet: bool) -> tuple[Any, Any]:
    from memfed.node.models import load_host_model, resolve_model_dir

    with progress_bar("loading the model", quiet=quiet):
        model, tokenizer = load_host_model(resolve_model_dir(model_dir))
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def _steering(store: Any, ref: str, model: Any) -> tuple[Any, Any]:
    """(cube, vector) of steering cube ``ref``, checked against ``model``."""
    from memfed.cube.fingerprint import check_base_model
    from memfed.cube.manifest import parse_ref
    from memfed.node.conversion.steering import check_applies, read_steering

    cube = store.get(*parse_ref(ref))
    check_base_model(cube.manifest.base_model, model, what=f"steering cube {cube.ref}")
    vector = read_steering(cube)
    check_applies(model, vector)
    return cube, vector


def _next_version(store: Any, cube_id: str, version: str | None) -> str:
    from memfed.node.conversion.triggers import next_version

    return version or next_version(store, cube_id)


@click.group()
def steer() -> None:
    """Steer behaviour with activation vectors; turn steering into modules (MemOS: activation → parameter).

    \b
      extract --cube-id ID     contrast pairs -> a steering cube (CAA: mean activation difference)
      eval CUBE                the behaviour the pairs define, with and without the vector
      ask CUBE PROMPT          generate with the vector applied (each call counts a use)
      distill CUBE --cube-id   a LoRA whose outputs match the steered model, tagged behavior_module
      proposals                steering cubes used often, not distilled yet (--apply distills them)
    Pairs: --pairs FILE (JSONL prompt/positive/negative); default: the embedded model's shipped
    context-faithfulness pairs (follow a passage that contradicts what the model memorized).
    """


@steer.command("extract")
@pairs_option
@click.option("--cube-id", required=True, help="Name of the steering cube to store.")
@click.option("--version", "version", default=None, help="Semantic version. Default: the next free one.")
@click.option("--layer", type=click.IntRange(min=0), default=None, help="Decoder block. Default: the best.")
@click.option(
    "--strength", type=click.FloatRange(min=0.0, min_open=True), default=None, help="Default: the best."
)
@model_option
@store_option
@json_option
def extract_cmd(
    pairs_file: Path | None,
    cube_id: str,
    version: str | None,
    layer: int | None,
    strength: float | None,
    model_dir: Path | None,
    store_dir: Path | None,
    as_json: bool,
) -> None:
    """Build a steering vector from contrast pairs and store it as a steering cube.

    The vector is the mean difference of one decoder block's output over the answer tokens of
    prompt+positive and prompt+negative. Without --layer every block is tried, without --strength a
    small grid; the pair that best shows the behaviour on the pairs wins.
    """
    from memfed.node.conversion.steering import extract, steering_cube
    from memfed.node.store import CubeStore

    pairs = _pairs(pairs_file, "train")
    model, tokenizer = _model(model_dir, as_json)
    with progress_bar("extracting the steering vector", quiet=as_json):
        vector, report = extract(model, tokenizer, pairs, layer=layer, strength=strength)
    source = str(pairs_file) if pairs_file else "memfed:context_pairs/train"
    with CubeStore(resolve_store(store_dir)) as store:
        cube = steering_cube(
            model,
            vector,
            cube_id=cube_id,
            version=_next_version(store, cube_id, version),
            sources=[source],
            params={"pairs": len(pairs)},
        )
        store.put(cube.manifest, cube.payload)
    data = {"ref": cube.ref, **report.to_dict()}
    if as_json:
        emit_json(data)
        return
    b0, b1 = report.behaviour_before, report.behaviour_steered
    console.print(
        f"stored [bold]{cube.ref}[/]: layer {report.layer}, strength {report.strength:g}, "
        f"|v| = {report.vector_norm:.3f}, from {report.pairs} pairs in {report.seconds:.1f} s"
    )
    console.print(f"  behaviour on the pairs: {b0['rate']:.1%} → {b1['rate']:.1%} with the vector")


@steer.command("eval")
@click.argument("ref")
@pairs_option
@click.option("--strength", type=float, default=None, help="Override the cube's strength.")
@model_option
@store_option
@json_option
def eval_cmd(
    ref: str,
    pairs_file: Path | None,
    strength: float | None,
    model_dir: Path | None,
    store_dir: Path | None,
    as_json: bool,
) -> None:
    """The behaviour rate (positive answer scored above the negative) with and without steering cube REF."""
    from memfed.node.conversion.steering import behaviour, steered
    from memfed.node.store import CubeStore

    pairs = _pairs(pairs_file, "heldout")
    model, tokenizer = _model(model_dir, as_json)
    with CubeStore(resolve_store(store_dir)) as store:
        cube, vector = _steering(store, ref, model)
    before = behaviour(model, tokenizer, pairs)
    with steered(model, vector, strength):
        after = behaviour(model, tokenizer, pairs)
    data = {"ref": cube.ref, "pairs": len(pairs), "without": before.to_dict(), "with": after.to_dict()}
    if as_json:
        emit_json(data)
        return
    console.print(
        f"{cube.ref} on {len(pairs)} pairs: behaviour {before.rate:.1%} without, {after.rate:.1%} with "
        f"(mean log-prob margin {before.margin:+.2f} → {after.margin:+.2f})"
    )


@steer.command("ask")
@click.argument("ref")
@click.argument("prompt")
@click.option("--strength", type=float, default=None, help="Override the cube's strength.")
@click.option("--max-new-tokens", type=click.IntRange(1, 512), default=16, show_default=True)
@model_option
@store_option
@json_option
def ask_cmd(
    ref: str,
    prompt: str,
    strength: float | None,
    max_new_tokens: int,
    model_dir: Path | None,
    store_dir: Path | None,
    as_json: bool,
) -> None:
    """Answer PROMPT without and with steering cube REF (greedy). Counts one use of REF."""
    from memfed.node.conversion.probing import generate
    from memfed.node.conversion.steering import record_use, steered
    from memfed.node.runtime import ModuleRuntime
    from memfed.node.store import CubeStore

    model, tokenizer = _model(model_dir, as_json)
    with CubeStore(resolve_store(store_dir)) as store:
        cube, vector = _steering(store, ref, model)
        runtime = ModuleRuntime(model)
        try:
            plain = generate(runtime, tokenizer, [prompt], max_new_tokens=max_new_tokens)[0]
            with steered(model, vector, strength):
                steered_text = generate(runtime, tokenizer, [prompt], max_new_tokens=max_new_tokens)[0]
        finally:
            runtime.close()
        uses = record_use(store, cube.ref)
    data = {"ref": cube.ref, "prompt": prompt, "without": plain, "with": steered_text, "uses": uses}
    if as_json:
        emit_json(data)
        return
    console.print(f"[dim]without:[/] {plain.strip()}")
    console.print(f"[bold]with {cube.ref}:[/] {steered_text.strip()}")


def _distill_one(
    store: Any,
    model: Any,
    tokenizer: Any,
    ref: str,
    cube_id: str,
    version: str | None,
    steps: int,
    pairs_file: Path | None,
    quiet: bool,
) -> dict[str, Any]:
    from memfed.node.conversion.steering import (
        distill,
        distilled_cube,
        evaluate_distilled,
        neutral_prompts,
    )
    from memfed.node.conversion.train import LoraTrainConfig

    cube, vector = _steering(store, ref, model)
    pairs, heldout = _split(pairs_file)
    config = LoraTrainConfig(rank=8, alpha=16.0, lr=5e-3, steps=steps, batch_size=32)
    neutral = neutral_prompts(128)
    with progress_bar(f"distilling {cube.ref}", quiet=quiet) as update:
        trained = distill(
            model, tokenizer, vector, pairs, config=config, extra_texts=neutral[:64], progress=update
        )
    module = distilled_cube(
        model, trained, cube.ref, cube_id=cube_id, version=_next_version(store, cube_id, version)
    )
    report = evaluate_distilled(
        model, tokenizer, vector, module, heldout, extra_texts=neutral[64:], trained=trained
    )
    store.put(module.manifest, module.payload)
    return {"ref": module.ref, "steering": cube.ref, **report.to_dict()}


@steer.command("distill")
@click.argument("ref")
@pairs_option
@click.option("--cube-id", required=True, help="Name of the module cube to store.")
@click.option("--version", "version", default=None, help="Semantic version. Default: the next free one.")
@click.option("--steps", type=click.IntRange(min=1), default=150, show_default=True, help="Training steps.")
@model_option
@store_option
@json_option
def distill_cmd(
    ref: str,
    pairs_file: Path | None,
    cube_id: str,
    version: str | None,
    steps: int,
    model_dir: Path | None,
    store_dir: Path | None,
    as_json: bool,
) -> None:
    """Distill steering cube REF into a LoRA module (tagged behavior_module) and report its fidelity:
    KL to the steered model next to the bare model's, and the behaviour on held-out pairs."""
    from memfed.node.store import CubeStore

    model, tokenizer = _model(model_dir, as_json)
    with CubeStore(resolve_store(store_dir)) as store:
        data = _distill_one(store, model, tokenizer, ref, cube_id, version, steps, pairs_file, as_json)
    if as_json:
        emit_json(data)
        return
    _print_distilled(data)


def _print_distilled(d: dict[str, Any]) -> None:
    console.print(
        f"stored [bold]{d['ref']}[/] (behavior_module) from {d['steering']}: "
        f"{d['steps']} steps, {d['seconds']:.1f} s"
    )
    console.print(
        f"  KL to the steered model per token: {d['kl_distilled']:.4f} (bare model: {d['kl_unsteered']:.4f}; "
        f"fidelity {d['fidelity']:.1%})"
    )
    b = (d["behaviour_before"]["rate"], d["behaviour_steered"]["rate"], d["behaviour_distilled"]["rate"])
    console.print(f"  behaviour on held-out pairs: bare {b[0]:.1%}, steered {b[1]:.1%}, module {b[2]:.1%}")


@steer.command("proposals")
@click.option("--min-uses", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--apply", is_flag=True, help="Distill every proposal now (module id: <steering id>.module).")
@click.option("--steps", type=click.IntRange(min=1), default=150, show_default=True, help="Training steps.")
@model_option
@store_option
@json_option
def proposals_cmd(
    min_uses: int, apply: bool, steps: int, model_dir: Path | None, store_dir: Path | None, as_json: bool
) -> None:
    """Steering cubes applied at least --min-uses times with no module distilled from them yet."""
    from memfed.cube.manifest import parse_ref
    from memfed.node.conversion.steering import distill_proposals
    from memfed.node.store import CubeStore

    with CubeStore(resolve_store(store_dir)) as store:
        found = distill_proposals(store, min_uses=min_uses)
        done: list[dict[str, Any]] = []
        if apply and found:
            model, tokenizer = _model(model_dir, as_json)
            for p in found:
                cube_id = f"{parse_ref(p.ref)[0]}.module"
                done.append(_distill_one(store, model, tokenizer, p.ref, cube_id, None, steps, None, as_json))
    if as_json:
        emit_json({"proposals": [p.to_dict() for p in found], "distilled": done})
        return
    if not found:
        console.print(f"no steering cube has been used {min_uses} times without a distilled module")
    for p in found:
        console.print(f"{p.ref}: {p.uses} uses")
    for d in done:
        _print_distilled(d)
