"""``memfed edit``: find where a fact lives, rewrite it as an edit cube, and measure edits.

Every edit is a cube in the store (kind ``edit``): ``apply`` writes the next version of a cube id, so a
lifecycle rollback (``memfed module rollback``) goes back to an earlier set of edits exactly.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import click

from memfed.cli.options import json_option, model_option, resolve_store, store_option
from memfed.cli.output import console, emit_json, progress_bar
from memfed.errors import InvalidArgumentError

METHODS = ("grace", "rome", "memit", "mend", "gradfree", "serac")  # as memfed.node.editing.apply.METHODS
DEFAULT_CODEBOOK = "edits"


@click.group()
def edit() -> None:
    """Fact editing: causal tracing, ROME / MEMIT / MEND weight edits, GRACE codebook edits, evaluation.

    \b
      memfed edit trace "The capital of Veltria is" --subject Veltria
      memfed edit apply "The capital of Veltria is" --subject Veltria --target Quorn
      memfed edit train-editor && memfed edit apply ... --method mend
      memfed edit ask "The capital of Veltria is" --cube edits
      memfed edit eval --method rome --limit 50
    """


def _load(model_dir: Path | None, quiet: bool) -> tuple[Any, Any]:
    from memfed.node.models import load_host_model

    with progress_bar("loading model", quiet=quiet):
        return load_host_model(model_dir)


# -- trace --------------------------------------------------------------------------------------------


@edit.command("trace")
@click.argument("prompt")
@click.option("--subject", required=True, help="The entity the fact is about; must appear in PROMPT.")
@click.option("--target", default=None, help="Answer to trace (default: the model's own next token).")
@click.option("--samples", default=8, show_default=True, type=click.IntRange(1, 64), help="Noise samples.")
@click.option("--noise", default=3.0, show_default=True, type=float, help="Noise, in embedding std units.")
@click.option(
    "--png",
    "png",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the heat maps to this PNG file.",
)
@model_option
@json_option
def trace_cmd(
    prompt: str, subject: str, target: str | None, samples: int, noise: float, png: Path | None,
    model_dir: Path | None, as_json: bool,
) -> None:  # fmt: skip
    """Causal tracing of PROMPT: which layer and token carry the fact about SUBJECT.

    The subject's embeddings are corrupted with noise; restoring one clean hidden state (residual, MLP
    output or attention output) at one layer and token shows how much of the answer it brings back (the
    indirect effect). The layer with the strongest MLP effect at the subject is where edits go.
    """
    from memfed.node.editing.trace import causal_trace

    model, tokenizer = _load(model_dir, as_json)
    with progress_bar("tracing", quiet=as_json):
        result = causal_trace(model, tokenizer, prompt, subject, target=target, noise=noise, samples=samples)
    if png is not None:
        from memfed.node.editing.heatmap import write_trace_png

        write_trace_png(result, png)
    data = result.to_dict()
    if png is not None:
        data["png"] = str(png)
    if as_json:
        emit_json(data)
        return
    _print_trace(result)
    if png is not None:
        console.print(f"heat map written to [bold]{png}[/]")


def _print_trace(result: Any) -> None:
    from rich.table import Table

    console.print(
        f"answer [bold]{result.answer!r}[/]: p = {result.p_clean:.3f} clean, {result.p_corrupt:.3f} with the "
        f"subject corrupted ({result.samples} samples, noise {result.noise}× embedding std)"
    )
    first, last = result.subject_range
    for kind, title in (("mlp", "MLP output"), ("attn", "attention output"), ("hidden", "residual stream")):
        table = Table(title=f"indirect effect: {title}", title_justify="left")
        table.add_column("token")
        for layer in range(result.num_layers):
            table.add_column(f"L{layer}", justify="right")
        effects = result.effects[kind]
        peak = max((v for row in effects for v in row), default=0.0) or 1.0
        for t, token in enumerate(result.tokens):
            label = repr(token)[1:-1] + (" *" if first <= t <= last else "")
            cells = []
            for layer in range(result.num_layers):
                v = effects[layer][t]
                shade = "bold" if v >= 0.5 * peak and v > 0.05 else ""
                cells.append(f"[{shade}]{v:.3f}[/]" if shade else f"{v:.3f}")
            table.add_row(label, *cells)
        console.print(table)
    console.print(
        "* subject tokens. Strongest MLP effect at the subject: layer "
        f"[bold]{result.best_layer('mlp', 'all')}[/] "
        "(where `memfed edit apply` edits by default)"
    )


# -- apply --------------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text.strip()).strip("-.")[:60] or "fact"


def _default_cube(method: str, subject: str | None, from_file: Path | None) -> str:
    if method == "grace":
        return DEFAULT_CODEBOOK
    return f"edit-{_slug(subject or (from_file.stem if from_file else 'batch'))}"


def _requests_from_file(editor: Any, path: Path, force: bool) -> list[Any]:
    """Edit requests from a CounterFact-format file, or JSON Lines of {prompt, subject, target}."""
    from memfed.node.editing.counterfact import load_cases

    first = path.read_text(encoding="utf-8").lstrip()[:4096]
    if "requested_rewrite" in first:
        cases = load_cases(path)
        return [
            editor.request(c.prompt, c.subject, c.target_new, case_id=c.case_id, force=force) for c in cases
        ]
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            out.append(
                editor.request(
                    rec["prompt"], rec["subject"], rec["target"], case_id=rec.get("id"), force=force
                )
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidArgumentError(
                f"{path} line {i + 1}: not an edit request ({exc})",
                hint='one {"prompt": ..., "subject": ..., "target": ...} per line, or a CounterFact file',
            ) from exc
    if not out:
        raise InvalidArgumentError(f"{path} holds no edit requests")
    return out


@edit.command("apply")
@click.argument("prompt", required=False)
@click.option("--subject", default=None, help="The entity the fact is about; must appear in PROMPT.")
@click.option("--target", default=None, help="The new answer that should follow PROMPT.")
@click.option(
    "--from-file",
    "from_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Many edits: a CounterFact file, or JSON Lines of {prompt, subject, target}.",
)
@click.option(
    "--method",
    type=click.Choice(METHODS),
    default="grace",
    show_default=True,
    help="grace: codebook entry (for many sequential edits); rome: rank-one weight edit; memit: "
    "one batch edit over several layers; mend: a trained editor's update, milliseconds per edit "
    "(memfed edit train-editor first); gradfree: rank-one edit from forward passes only; serac: an "
    "entry in a scoped edit memory (no weights change; prompts about the edited fact get the new answer).",
)
@click.option(
    "--editor",
    "editor_ref",
    default=None,
    help="With --method mend: the editor cube (ID[@VERSION]). Default: the newest one for this model.",
)
@click.option("--layer", type=int, default=None, help="Layer to edit (default: chosen by causal tracing).")
@click.option(
    "--cube",
    "cube_id",
    default=None,
    help=f"Cube id to add the edit to as its next version (default: '{DEFAULT_CODEBOOK}' for grace, "
    "'edit-<subject>' otherwise).",
)
@click.option("--force", is_flag=True, help="Edit even if the model already gives the target.")
@store_option
@model_option
@json_option
def apply_cmd(
    prompt: str | None, subject: str | None, target: str | None, from_file: Path | None, method: str,
    editor_ref: str | None, layer: int | None, cube_id: str | None, force: bool, store_dir: Path | None,
    model_dir: Path | None, as_json: bool,
) -> None:  # fmt: skip
    """Rewrite a fact: after PROMPT (which names SUBJECT) the model should say TARGET.

    The edit is stored as the next version of an edit cube (kind `edit`) that records subject, old and
    new answer and layer in its origin. With --method grace (the default) every edit joins one growing
    codebook cube; rome, memit, mend and gradfree write low-rank weight updates that the node runtime runs
    like a LoRA. mend edits with a trained editor cube (memfed edit train-editor), all requests in one
    pass; gradfree reads the new value from the model's own hidden states (no backward pass). serac adds
    the edit to a scoped edit memory: a prompt that asks the edited fact (its subject and its question,
    as calibrated on the shipped cases' train split) gets the new answer, every other prompt the
    untouched model (`memfed edit ask --cube CUBE`).
    """
    from memfed.node.editing.apply import apply_edits
    from memfed.node.editing.editor import Editor
    from memfed.node.store import CubeStore

    if from_file is None and not (prompt and subject and target):
        raise click.UsageError("give PROMPT with --subject and --target, or --from-file FILE")
    if from_file is not None and prompt:
        raise click.UsageError("give either PROMPT or --from-file, not both")
    if editor_ref is not None and method != "mend":
        raise click.UsageError("--editor goes with --method mend")
    model, tokenizer = _load(model_dir, as_json)
    editor = Editor(model, tokenizer)
    calibration = []
    if method == "serac":
        from memfed.node.editing.counterfact import load_cases, split_cases

        calibration = split_cases(load_cases())[0]
    with CubeStore(resolve_store(store_dir)) as store:
        mend = _mend_editor(store, model, tokenizer, editor_ref) if method == "mend" else None
        t0 = time.perf_counter()
        with progress_bar(f"editing ({method})", quiet=as_json):
            report = apply_edits(
                editor,
                store,
                method=method,
                layer=layer,
                cube_id=cube_id,
                force=force,
                single=(prompt, subject, target) if from_file is None else None,
                requests_from=(lambda: _requests_from_file(editor, from_file, force)) if from_file else None,
                default_cube=_default_cube(method, subject, from_file),
                mend=mend,
                calibration=calibration,
            )
        report["seconds"] = round(time.perf_counter() - t0, 3)
    if as_json:
        emit_json(report)
        return
    where = f"layer {report['layers']}" if report["layers"] else "no layer changed"
    console.print(f"stored [bold]{report['cube']}[/] ({report['method']}, {where})")
    for change in report["changes"]:
        console.print(
            f"  {change['subject']}: {change['old']!r} → {change['new']!r}  "
            f"(now answers {change['answer_after']!r})"
        )
    console.print(
        f"  {report['seconds']:.1f} s; roll back with `memfed module rollback {report['cube_id']} VERSION`"
    )


def _mend_editor(store: Any, model: Any, tokenizer: Any, ref: str | None) -> Any:
    """The MEND editor cube ``ref`` (or the newest for ``model``), read for ``model``: NotFoundError when
    there is none, IncompatibleModelError when it was trained for another base model."""
    from memfed.cube.manifest import parse_ref
    from memfed.node.editing.mend_cube import newest_mend, read_mend

    if ref is None:
        return read_mend(newest_mend(store, model), model, tokenizer)
    cube_id, version = parse_ref(ref)
    return read_mend(store.get(cube_id, version or store.current_version(cube_id)), model, tokenizer)


# -- train-editor -------------------------------------------------------------------------------------


@edit.command("train-editor")
@click.option(
    "--cases",
    "cases_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="CounterFact-format cases; the editor trains on their train split only. Default: the shipped "
    "file for the embedded model.",
)
@click.option(
    "--layer", "layers", type=int, multiple=True, help="Layer to edit (repeatable; default: traced)."
)
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Training steps (default 400).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--cube", "cube_id", default="mend-editor", show_default=True, help="Cube id of the editor.")
@store_option
@model_option
@json_option
def train_editor_cmd(
    cases_file: Path | None, layers: tuple[int, ...], steps: int | None, seed: int, cube_id: str,
    store_dir: Path | None, model_dir: Path | None, as_json: bool,
) -> None:  # fmt: skip
    """Train a MEND editor for the model and store it as an editor cube bound to that model.

    The editor learns to turn one edit's gradient at the subject into a weight update (a network per
    edited layer), on the train split of the cases (split by subject); afterwards `memfed edit apply
    --method mend` edits in milliseconds, with no optimization loop.
    """
    from dataclasses import replace

    from memfed.node.conversion.triggers import next_version
    from memfed.node.editing.counterfact import load_cases, split_cases
    from memfed.node.editing.editor import Editor
    from memfed.node.editing.mend import MendConfig
    from memfed.node.editing.mend_cube import mend_cube
    from memfed.node.editing.mend_train import train_mend
    from memfed.node.store import CubeStore

    config = MendConfig(layers=layers, seed=seed)
    if steps is not None:
        config = replace(config, steps=steps)
    train, test = split_cases(load_cases(cases_file))
    config.check()
    model, tokenizer = _load(model_dir, as_json)
    editor = Editor(model, tokenizer)
    for layer in config.layers:
        editor.check_layer(layer)
    if not config.layers:
        config = replace(config, layers=(editor.choose_layer([c.request() for c in train[:4]], "all"),))
    with CubeStore(resolve_store(store_dir)) as store:
        version = next_version(store, cube_id)
        with progress_bar("training the MEND editor", quiet=as_json) as update:
            mend = train_mend(
                model, tokenizer, train, config, editor.second_moments, fingerprint=editor.fingerprint,
                progress=update,
            )  # fmt: skip
        cube = mend_cube(mend, cube_id=cube_id, version=version)
        store.put(cube.manifest, cube.payload)
    data = {"ref": cube.ref, "train_cases": len(train), "held_out_cases": len(test), **mend.info}
    if as_json:
        emit_json(data)
        return
    console.print(
        f"stored MEND editor [bold]{cube.ref}[/] (layers {mend.info['layers']}, {len(train)} training "
        f"cases, {mend.info['train_seconds']} s); edit with `memfed edit apply ... --method mend`"
    )


# -- ask ----------------------------------------------------------------------------------------------


@edit.command("ask")
@click.argument("prompt")
@click.option(
    "--cube",
    "cube_ids",
    multiple=True,
    default=(DEFAULT_CODEBOOK,),
    show_default=True,
    help="Edit cube(s) whose current version is in effect (repeatable).",
)
@store_option
@model_option
@json_option
def ask_cmd(
    prompt: str, cube_ids: tuple[str, ...], store_dir: Path | None, model_dir: Path | None, as_json: bool
) -> None:
    """The model's answer after PROMPT, without and with the current version of the edit cubes."""
    from memfed.cube.fingerprint import check_base_model
    from memfed.node.editing.cubes import edit_form, read_edit
    from memfed.node.editing.editor import Editor
    from memfed.node.editing.lineage import attach_current, current_cube
    from memfed.node.editing.scope_path import scoped_answer
    from memfed.node.store import CubeStore

    model, tokenizer = _load(model_dir, as_json)
    editor = Editor(model, tokenizer)
    before = editor.answer(prompt)
    with CubeStore(resolve_store(store_dir)) as store:
        # Scoped edit memories change no weights: they decide per prompt, on top of the other edits.
        memories = [c for c in (current_cube(store, i) for i in cube_ids) if edit_form(c.manifest) == "scope"]
        if len(memories) > 1:
            raise click.UsageError("give at most one scoped (serac) edit cube")
        attached = attach_current(
            model, store, [i for i in cube_ids if i not in {m.manifest.cube_id for m in memories}]
        )
        try:
            if memories:
                check_base_model(memories[0].manifest.base_model, model, what=f"edit cube {memories[0].ref}")
                after = scoped_answer(model, tokenizer, read_edit(memories[0]), prompt)  # type: ignore[arg-type]
            else:
                after = editor.answer(prompt)
        finally:
            for a in reversed(attached):
                a.remove()
    refs = [a.ref for a in attached] + [m.ref for m in memories]
    data = {"prompt": prompt, "unedited": before, "edited": after, "cubes": refs}
    if as_json:
        emit_json(data)
        return
    console.print(f"unedited: {before!r}\nedited ({', '.join(data['cubes'])}): [bold]{after!r}[/]")


# -- show ---------------------------------------------------------------------------------------------


@edit.command("show")
@click.argument("ref")
@store_option
@json_option
def show_cmd(ref: str, store_dir: Path | None, as_json: bool) -> None:
    """What an edit cube changed: its method, layers and every fact (subject, old → new)."""
    from memfed.cube.manifest import parse_ref
    from memfed.node.editing.cubes import describe_edit
    from memfed.node.store import CubeStore

    cube_id, version = parse_ref(ref)
    with CubeStore(resolve_store(store_dir)) as store:
        cube = store.get(cube_id, version or store.current_version(cube_id))
    data = describe_edit(cube)
    if as_json:
        emit_json(data)
        return
    console.print(
        f"[bold]{data['cube']}[/]: {data['form']} edit ({data['method']}) at layer {data['layers']}"
    )
    for line in data["changes"]:
        console.print(f"  {line}")


# -- eval ---------------------------------------------------------------------------------------------


@edit.command("eval")
@click.argument("cases_file", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--method",
    type=click.Choice([*(m for m in METHODS if m != "serac"), "none"]),
    default="rome",
    show_default=True,
    help="rome: each case edited alone; memit: all cases in one batch; grace: all cases one after "
    "another into one codebook; mend: each case alone with the trained editor; gradfree: each case "
    "alone, forward passes only; none: the unedited model. (Scoped editing: `memfed bench evolve`.)",
)
@click.option("--limit", type=click.IntRange(1), default=None, help="Only the first N cases.")
@click.option("--layer", type=int, default=None, help="Layer to edit (default: chosen by causal tracing).")
@click.option(
    "--editor", "editor_ref", default=None, help="With --method mend: the editor cube (default: the newest)."
)
@store_option
@model_option
@json_option
def eval_cmd(
    cases_file: Path | None,
    method: str,
    limit: int | None,
    layer: int | None,
    editor_ref: str | None,
    store_dir: Path | None,
    model_dir: Path | None,
    as_json: bool,
) -> None:
    """Efficacy, generalization, locality and fluency of edits over a CounterFact-format file.

    CASES_FILE defaults to the shipped file for the embedded model (400 cases).
    """
    from memfed.node.editing.counterfact import COUNTERFACT_PATH, load_cases
    from memfed.node.editing.editor import Editor
    from memfed.node.editing.protocols import evaluate_method

    cases = load_cases(cases_file, limit=limit)
    model, tokenizer = _load(model_dir, as_json)
    editor = Editor(model, tokenizer)
    mend = None
    if method == "mend":
        from memfed.node.store import CubeStore

        with CubeStore(resolve_store(store_dir)) as store:
            mend = _mend_editor(store, model, tokenizer, editor_ref)
    with progress_bar(f"evaluating {method} on {len(cases)} cases", quiet=as_json):
        summary = evaluate_method(editor, cases, method, layer=layer, mend=mend)
    summary["file"] = str(cases_file or COUNTERFACT_PATH)
    if as_json:
        emit_json(summary)
        return
    from rich.table import Table

    table = Table(title=f"{method} on {len(cases)} cases", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)
