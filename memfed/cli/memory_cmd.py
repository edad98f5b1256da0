"""``memfed memory``: move knowledge between plaintext and parameters, on the local store and vault.

internalize (text → LoRA cube, validated before it is registered), proposals (hot, stable text worth
internalizing), externalize (what a module changes → reviewable text), migrate (a module to a model of
another architecture, through text) and conflicts (new text that contradicts an active module).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from memfed.cli.options import json_option, model_option, resolve_store, store_option
from memfed.cli.output import console, emit_json, err_console, progress_bar
from memfed.config import memfed_home

vault_option = click.option(
    "--vault",
    "--plaintext",
    "vault_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The plaintext memory (SQLite) the node reads from. Default: $MEMFED_HOME/plaintext.db.",
)


def _train_options(func: Any) -> Any:
    for option in reversed(
        [
            click.option(
                "--min-recall",
                type=click.FloatRange(0.0, 1.0),
                default=0.5,
                show_default=True,
                help="Gate: held-out recall the module must reach to be registered.",
            ),
            click.option("--steps", type=click.IntRange(min=1), default=None, help="Training steps (auto)."),
            click.option(
                "--rank", type=click.IntRange(min=1), default=8, show_default=True, help="LoRA rank."
            ),
            click.option(
                "--lr", type=click.FloatRange(min=0.0, min_open=True), default=5e-3, show_default=True
            ),
        ]
    ):
        func = option(func)
    return func


def _settings(min_recall: float, steps: int | None, rank: int, lr: float) -> Any:
    from memfed.node.conversion.internalize import InternalizeSettings
    from memfed.node.conversion.train import LoraTrainConfig

    train = LoraTrainConfig(rank=rank, alpha=2.0 * rank, steps=steps, lr=lr)
    return InternalizeSettings(train=train, min_recall=min_recall)


def _vault_path(vault_path: Path | None) -> Path:
    return vault_path or memfed_home() / "plaintext.db"


@contextmanager
def _opened(store_dir: Path | None, vault_path: Path | None) -> Iterator[tuple[Any, Any]]:
    from memfed.node.plaintext import PlaintextMemory
    from memfed.node.store import CubeStore

    with CubeStore(resolve_store(store_dir)) as store, PlaintextMemory(_vault_path(vault_path)) as vault:
        yield store, vault


def _load_model(model_dir: Path | None, quiet: bool) -> tuple[Any, Any, str]:
    from memfed.node.models import load_host_model, resolve_model_dir

    path = resolve_model_dir(model_dir)
    with progress_bar("loading the model", quiet=quiet):
        model, tokenizer = load_host_model(path)
    return model, tokenizer, path.name


def _print_internalized(r: dict[str, Any]) -> None:
    s = r["seconds"]
    console.print(
        f"internalized {len(r['documents'])} document(s), {r['facts']} facts ({r['training_items']} training "
        f"items) into [bold]{r['ref']}[/] in {s['total']:.1f} s (training {s.get('train', 0):.1f} s)"
    )
    console.print(
        f"  recall on {r['heldout_probes']} held-out questions: {r['recall_heldout']:.2f} (gate "
        f"{r['min_recall']:.2f}; bare model {r['recall_heldout_before']:.2f}); on trained phrasings "
        f"{r['recall_trained']:.2f}; other answers unchanged: {r['retention']:.0%}"
    )


def _gate_failed(exc: Any, as_json: bool) -> int:
    report = getattr(exc, "report", None)
    data = report.to_dict() if report is not None else {}
    err_console.print(f"[bold red]not registered:[/] {exc}", soft_wrap=True)
    if as_json:
        emit_json({**data, "error": {"type": type(exc).__name__, "message": exc.message, "hint": exc.hint}})
    elif data:
        _print_internalized(data)
    return int(exc.exit_code)


@click.group()
def memory() -> None:
    """Convert memory between plaintext and parameters (MemOS: internalize / externalize).

    \b
      internalize DOC...   documents -> a LoRA cube, registered only if it answers held-out questions
                           (--fast: written by a parameter translator, trained only if that fails)
      translator train     train the parameter translator --fast uses (an editor cube for this model)
      proposals            plaintext read often and stable: candidates to internalize (--apply does it)
      externalize CUBE     what a module changes -> text in the vault, marked pending_review
      migrate CUBE --to M  a module to a model of another architecture, through text
      conflicts            new text that contradicts an active module (--check looks for them)
    The vault is the node's plaintext memory (--vault, default $MEMFED_HOME/plaintext.db).
    """


@memory.command("internalize")
@click.argument("docs", nargs=-1, required=True)
@click.option("--cube-id", default=None, help="Cube name. Default: plain.<doc id> (one document only).")
@click.option("--version", "version", default=None, help="Semantic version. Default: the next free one.")
@click.option(
    "--fast",
    is_flag=True,
    help="Write the module with the newest parameter translator (ms); train if it fails the gate.",
)
@click.option("--translator", "translator_ref", default=None, help="With --fast: this translator cube (REF).")
@click.option(
    "--no-fallback", is_flag=True, help="With --fast: fail instead of training when below the gate."
)
@_train_options
@model_option
@store_option
@vault_option
@json_option
def internalize_cmd(
    docs: tuple[str, ...],
    cube_id: str | None,
    version: str | None,
    fast: bool,
    translator_ref: str | None,
    no_fallback: bool,
    min_recall: float,
    steps: int | None,
    rank: int,
    lr: float,
    model_dir: Path | None,
    store_dir: Path | None,
    vault_path: Path | None,
    as_json: bool,
) -> int:
    """Internalize documents DOC... (files, or ids of vault documents) into a LoRA cube.

    Each document is augmented (every fact in every trained phrasing, clozes, question-answer pairs),
    a PEFT LoRA is trained on it, and recall is checked on held-out phrasings before anything is stored.
    Below --min-recall the cube is not registered and the command exits with code 15. On success the
    source texts are archived in the vault and linked (id, version, digest) in the cube's origin.
    --fast writes the module with a parameter translator (memfed memory translator train) in one forward
    pass, checks it with the same gate, and trains as above when it falls short (unless --no-fallback).
    """
    from memfed.errors import InvalidArgumentError, QualityGateError
    from memfed.node.conversion.documents import Document, parse_document, read_document
    from memfed.node.conversion.internalize import internalize
    from memfed.node.conversion.triggers import cube_id_for, next_version

    settings = _settings(min_recall, steps, rank, lr)
    with _opened(store_dir, vault_path) as (store, vault):
        documents: list[Document] = []
        for ref in docs:
            if Path(ref).is_file():
                documents.append(read_document(ref))
            else:
                doc = vault.get(ref, count_access=False)  # NotFoundError names the id
                documents.append(parse_document(doc.text, doc_id=doc.doc_id, title=doc.title))
        if cube_id is None:
            if len(documents) > 1:
                raise InvalidArgumentError("several documents need a cube name", hint="pass --cube-id NAME")
            cube_id = cube_id_for(documents[0].doc_id)
        version = version or next_version(store, cube_id)
        model, tokenizer, name = _load_model(model_dir, as_json)
        if fast:
            return _internalize_fast(
                model, tokenizer, name, documents, store, vault, settings, cube_id, version,
                translator_ref, not no_fallback, as_json,
            )  # fmt: skip
        with progress_bar("internalizing: training the LoRA", quiet=as_json) as update:
            try:
                report, _ = internalize(
                    model,
                    tokenizer,
                    documents,
                    cube_id=cube_id,
                    version=version,
                    store=store,
                    vault=vault,
                    settings=settings,
                    model_name=name,
                    progress=lambda stage, done, total: update(done, total) if stage == "train" else None,
                )
            except QualityGateError as exc:
                return _gate_failed(exc, as_json)
    data = report.to_dict()
    if as_json:
        emit_json(data)
    else:
        _print_internalized(data)
    return 0


def _internalize_fast(
    model: Any,
    tokenizer: Any,
    name: str,
    documents: list[Any],
    store: Any,
    vault: Any,
    settings: Any,
    cube_id: str,
    version: str,
    translator_ref: str | None,
    fallback: bool,
    as_json: bool,
) -> int:
    """``internalize --fast``: the translator's module if it passes the gate, else (fallback) training."""
    from memfed.cube.manifest import parse_ref
    from memfed.errors import QualityGateError
    from memfed.node.conversion.translator_cube import newest_translator, read_translator
    from memfed.node.conversion.translator_fast import fast_internalize

    cube = store.get(*parse_ref(translator_ref)) if translator_ref else newest_translator(store, model)
    translator = read_translator(cube, model)
    with progress_bar("internalizing: translator, then the gate", quiet=as_json) as update:
        try:
            report, _ = fast_internalize(
                model, tokenizer, documents, translator, cube_id=cube_id, version=version, store=store,
                vault=vault, settings=settings, fallback=fallback, model_name=name,
                progress=lambda stage, done, total: update(done, total) if stage == "train" else None,
            )  # fmt: skip
        except QualityGateError as exc:
            return _gate_failed(exc, as_json)
    data = report.to_dict()
    if as_json:
        emit_json(data)
        return 0
    f = data["fast"]
    console.print(
        f"translator {f['translator']}: module in {f['generate_ms']:.0f} ms, held-out recall "
        f"{f['recall_heldout']:.2f} (gate {settings.min_recall:.2f})"
        + ("" if data["path"] == "fast" else f"; {data['fast_reason']}")
    )
    _print_internalized(data)
    return 0


@memory.group("translator")
def translator_group() -> None:
    """Parameter translators: networks that write a document's facts into a LoRA in one forward pass."""


@translator_group.command("train")
@click.option("--cube-id", default="translator", show_default=True, help="Name of the translator cube.")
@click.option("--version", "version", default=None, help="Semantic version. Default: the next free one.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Training steps (default 400).")
@click.option("--documents", "n_docs", type=click.IntRange(min=1), default=None, help="Synthetic documents.")
@click.option("--seed", type=int, default=0, show_default=True)
@model_option
@store_option
@json_option
def translator_train_cmd(
    cube_id: str,
    version: str | None,
    steps: int | None,
    n_docs: int | None,
    seed: int,
    model_dir: Path | None,
    store_dir: Path | None,
    as_json: bool,
) -> None:
    """Train a parameter translator for the model (--model) on synthetic documents and store it as an
    editor cube bound to that model; internalize --fast uses the newest one."""
    from dataclasses import replace

    from memfed.node.conversion.translator import TranslatorConfig
    from memfed.node.conversion.translator_cube import translator_cube
    from memfed.node.conversion.translator_train import train_translator
    from memfed.node.conversion.triggers import next_version
    from memfed.node.store import CubeStore

    config = TranslatorConfig(seed=seed)
    if steps is not None:
        config = replace(config, steps=steps)
    if n_docs is not None:
        config = replace(config, train_documents=n_docs)
    with CubeStore(resolve_store(store_dir)) as store:
        version = version or next_version(store, cube_id)
        model, tokenizer, _ = _load_model(model_dir, as_json)
        with progress_bar("training the translator", quiet=as_json) as update:
            translator = train_translator(model, tokenizer, config, progress=update)
        cube = translator_cube(translator, cube_id=cube_id, version=version)
        store.put(cube.manifest, cube.payload)
    data = {"ref": cube.ref, "config": config.to_json_dict(), **translator.info}
    if as_json:
        emit_json(data)
    else:
        console.print(f"stored translator [bold]{cube.ref}[/]: {translator.info}")


@memory.command("proposals")
@click.option("--min-per-hour", type=float, default=10.0, show_default=True, help="Reads an hour to be hot.")
@click.option(
    "--max-change", type=float, default=0.05, show_default=True, help="Largest change between versions."
)
@click.option("--window-s", type=float, default=3600.0, show_default=True, help="Window the rate is over.")
@click.option("--apply", is_flag=True, help="Internalize every proposal now (each gated as internalize).")
@_train_options
@model_option
@store_option
@vault_option
@json_option
def proposals_cmd(
    min_per_hour: float,
    max_change: float,
    window_s: float,
    apply: bool,
    min_recall: float,
    steps: int | None,
    rank: int,
    lr: float,
    model_dir: Path | None,
    store_dir: Path | None,
    vault_path: Path | None,
    as_json: bool,
) -> None:
    """List plaintext memories worth internalizing: read more than --min-per-hour times an hour, stable
    (no version changed more than --max-change), and not yet internalized in their current form."""
    from memfed.node.conversion.triggers import AutoInternalizer, AutoInternalizeSettings, proposals

    with _opened(store_dir, vault_path) as (store, vault):
        found = proposals(vault, store, min_per_hour=min_per_hour, max_change=max_change, window_s=window_s)
        outcomes: list[dict[str, Any]] = []
        if apply and found:
            model, tokenizer, _ = _load_model(model_dir, as_json)
            auto = AutoInternalizer(
                model,
                tokenizer,
                store,
                vault,
                AutoInternalizeSettings(
                    enabled=True,
                    min_per_hour=min_per_hour,
                    max_change=max_change,
                    window_s=window_s,
                    max_per_tick=len(found),
                    internalize=_settings(min_recall, steps, rank, lr),
                ),
            )
            with progress_bar(f"internalizing {len(found)} document(s)", quiet=as_json):
                outcomes = [vars(o) for o in auto.tick()]
    if as_json:
        emit_json({"proposals": [p.to_dict() for p in found], "applied": outcomes})
        return
    if not found:
        console.print("no proposals: nothing is both read often enough and stable")
        return
    table = Table("document", "reads/hour", "versions", "max change", "title")
    for p in found:
        table.add_row(
            p.doc_id, f"{p.accesses_per_hour:.1f}", str(p.versions), f"{p.max_change_fraction:.1%}", p.title
        )
    console.print(table)
    for o in outcomes:
        verdict = "registered" if o["registered"] else f"not registered: {o['reason']}"
        console.print(f"{o['doc_id']} -> {o['cube_ref']}: {verdict}")


@memory.command("externalize")
@click.argument("ref")
@click.option("--generic", is_flag=True, help="Use generic probes even when the cube's origin lists some.")
@model_option
@store_option
@vault_option
@json_option
def externalize_cmd(
    ref: str,
    generic: bool,
    model_dir: Path | None,
    store_dir: Path | None,
    vault_path: Path | None,
    as_json: bool,
) -> None:
    """Write what module REF (NAME or NAME@VERSION) changes as text in the vault, pending review.

    The model (--model, default the embedded one) is asked with and without the module; the answers the
    module changes become sentences in the document externalized/<ref>, status pending_review.
    """
    from memfed.cube.manifest import parse_ref
    from memfed.node.conversion.externalize import externalize

    with _opened(store_dir, vault_path) as (store, vault):
        cube = store.get(*parse_ref(ref))
        model, tokenizer, _ = _load_model(model_dir, as_json)
        with progress_bar(f"probing {cube.ref}", quiet=as_json) as update:
            report = externalize(model, tokenizer, cube, vault=vault, generic=generic, progress=update)
    if as_json:
        emit_json(report.to_dict())
        return
    console.print(
        f"{report.cube_ref}: {len(report.claims)} claims from {report.keys_probed} probed questions "
        f"({report.probe_source} probes, {report.seconds:.1f} s)"
        + (f"; written to [bold]{report.doc_id}[/] (pending_review)" if report.doc_id else "")
    )
    for c in report.claims:
        console.print(f"  {c.sentence}  [dim](bare model: {c.base_answer or '-'}; {c.votes}/{c.asked})[/]")


@memory.command("migrate")
@click.argument("ref")
@click.option(
    "--to",
    "target_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The target model's folder (any supported architecture).",
)
@click.option("--cube-id", default=None, help="Name of the new cube. Default: <cube id>.<model type>.")
@_train_options
@model_option
@store_option
@vault_option
@json_option
def migrate_cmd(
    ref: str,
    target_dir: Path,
    cube_id: str | None,
    min_recall: float,
    steps: int | None,
    rank: int,
    lr: float,
    model_dir: Path | None,
    store_dir: Path | None,
    vault_path: Path | None,
    as_json: bool,
) -> int:
    """Carry module REF to the model in --to through text: externalize on its own model (--model),
    internalize the text on the target, gated like internalize."""
    from memfed.cube.manifest import parse_ref
    from memfed.errors import QualityGateError
    from memfed.node.conversion.migrate import migrate
    from memfed.node.models import load_host_model, resolve_model_dir

    with _opened(store_dir, vault_path) as (store, vault):
        cube = store.get(*parse_ref(ref))
        model, tokenizer, _ = _load_model(model_dir, as_json)
        target_path = resolve_model_dir(target_dir)
        target, target_tok = load_host_model(target_path)
        with progress_bar(f"migrating {cube.ref}", quiet=as_json):
            try:
                report, _ = migrate(
                    model,
                    tokenizer,
                    cube,
                    target,
                    target_tok,
                    cube_id=cube_id,
                    store=store,
                    vault=vault,
                    settings=_settings(min_recall, steps, rank, lr),
                    target_name=target_path.name,
                )
            except QualityGateError as exc:
                return _gate_failed(exc, as_json)
    data = report.to_dict()
    if as_json:
        emit_json(data)
    else:
        console.print(
            f"{data['source_ref']} -> [bold]{data['target_ref']}[/] on {target_path.name}: "
            f"{data['facts_carried']} facts carried; recall on the target "
            f"{data['recall_on_target_heldout']:.2f} (held-out), {data['recall_on_target_trained']:.2f} "
            "(trained phrasings)"
        )
    return 0


@memory.command("conflicts")
@click.option("--check", is_flag=True, help="Look for new conflicts first (asks every module).")
@click.option("--module", "modules", multiple=True, help="Module to check (repeatable). Default: all live.")
@click.option("--doc", "doc_ids", multiple=True, help="Document to check (repeatable). Default: all active.")
@click.option("--all", "show_all", is_flag=True, help="List reviewed conflicts too, not only pending ones.")
@model_option
@store_option
@vault_option
@json_option
def conflicts_cmd(
    check: bool,
    modules: tuple[str, ...],
    doc_ids: tuple[str, ...],
    show_all: bool,
    model_dir: Path | None,
    store_dir: Path | None,
    vault_path: Path | None,
    as_json: bool,
) -> None:
    """List conflicts between plaintext and modules awaiting review; --check finds new ones.

    A conflict is a fact a plaintext document states that a module answers otherwise (and the bare model
    does not answer that way). Each is written as a review note next to the new text, and both are
    marked pending_review.
    """
    from memfed.node.conversion.governance import find_conflicts, list_conflicts, record_conflicts

    found: list[dict[str, Any]] = []
    with _opened(store_dir, vault_path) as (store, vault):
        if check:
            model, tokenizer, _ = _load_model(model_dir, as_json)
            cubes = _live_modules(store, modules, model)
            with progress_bar(f"checking {len(cubes)} module(s)", quiet=as_json):
                conflicts = find_conflicts(model, tokenizer, cubes, vault, doc_ids=list(doc_ids) or None)
                record_conflicts(vault, conflicts)
            found = [c.to_dict() for c in conflicts]
        listed = list_conflicts(vault, status=None if show_all else "pending_review")
    if as_json:
        emit_json({"found": found, "conflicts": listed})
        return
    if check:
        console.print(f"{len(found)} new conflicting fact(s)")
    if not listed:
        console.print("no conflicts awaiting review")
    for c in listed:
        console.print(f"[bold]{c['review_doc_id']}[/] ({c['status']})")
        for line in c["text"].splitlines()[1:3]:
            console.print(f"  {line}")


def _live_modules(store: Any, names: tuple[str, ...], model: Any) -> list[Any]:
    """The cubes to check: the named ones, or every live LoRA/adapter cube made for this model."""
    from memfed.cube.fingerprint import fingerprint_model
    from memfed.cube.manifest import kind_name, parse_ref

    if names:
        return [store.get(*parse_ref(n)) for n in names]
    fp = fingerprint_model(model)
    live = ("generated", "activated", "merged")
    out = []
    for m in store.list(states=live):
        if kind_name(m.kind) in ("lora", "adapter") and m.base_model.fingerprint_id == fp.fingerprint_id:
            out.append(store.get(m.cube_id, m.version))
    return out
