"""``memfed demo``: the main job, on the embedded default model, as a short measured story."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from memfed.cli.options import json_option, model_option
from memfed.cli.output import console, emit_json


class _Story:
    """Runs named steps, times each, and prints them as they finish."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.steps: list[dict[str, Any]] = []

    def step(self, name: str, title: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        if not self.quiet:
            console.print(f"[bold cyan]▶ {title}[/]")
        t0 = time.perf_counter()
        details = fn()
        seconds = time.perf_counter() - t0
        ok = bool(details.pop("ok", True))
        say = details.pop("say", "")
        record = {"name": name, "ok": ok, "seconds": round(seconds, 4), **details}
        self.steps.append(record)
        if not self.quiet:
            mark = "[green]✓[/]" if ok else "[red]✗[/]"
            console.print(f"  {mark} {say} [dim]({seconds:.2f} s)[/]")
        return record


@click.command()
@click.option("--keep", is_flag=True, help="Keep the demo's temporary store and files, and print where.")
@model_option
@json_option
def demo(keep: bool, model_dir: Path | None, as_json: bool) -> int:
    """Build the embedded model, make a LoRA module, and walk it through memfed as a cube.

    \b
    Steps: model (build or reuse the cached embedded model) -> make_adapter (teach it a new fact with
    PEFT) -> import (PEFT folder -> cube in a store) -> export_roundtrip (cube -> PEFT folder, outputs equal)
    -> foreign_model_refused (the cube refuses another base model) -> tamper_detected (a flipped byte in
    the store is caught). `--json` prints {"steps": [{"name", "ok", "seconds", ...}]}.
    """
    from memfed.cli import demo_steps

    work = Path(tempfile.mkdtemp(prefix="memfed-demo-"))
    story = _Story(quiet=as_json)
    try:
        demo_steps.run(story, work, model_dir)
    finally:
        if keep:
            if not as_json:
                console.print(f"kept demo state in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    ok = all(s["ok"] for s in story.steps)
    if as_json:
        emit_json({"ok": ok, "steps": story.steps, **({"work_dir": str(work)} if keep else {})})
    elif ok:
        console.print("[bold green]demo complete[/]")
    return 0 if ok else 1
