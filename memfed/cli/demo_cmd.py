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
        """Run one step; a step that raises is recorded as failed (with the error), so --json still
        reports how far the story got instead of ending in a traceback."""
        if not self.quiet:
            console.print(f"[bold cyan]▶ {title}[/]")
        t0 = time.perf_counter()
        try:
            details = fn()
        except Exception as exc:
            details = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "say": f"failed: {exc}"}
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
@click.option(
    "--fast",
    is_flag=True,
    help="CI mode: the federated round in-process (no SuperLink), smaller editor statistics.",
)
@model_option
@json_option
def demo(keep: bool, fast: bool, model_dir: Path | None, as_json: bool) -> int:
    """The whole network on loopback: a registry and three nodes (processes, mutual TLS), as a story.

    \b
    Steps: internalize (a document -> a LoRA cube on node A; answer before/after) -> hot_swap (activate
    and swap modules, one mixed-module batch) -> edit_rollback (edit one fact, roll it back) -> seal_send
    (grant B; B's sync pulls the cube sealed and watermarked for it, verifies, answers) -> deny (C has no
    grant; the audit log shows the denial) -> watermark_trace (B's copy names B) -> federated_round (A and
    B produce the next version of a shared cube) -> time_machine (archive, restore) -> externalize (the
    module back to text). `--json` prints {"steps": [{"name", "ok", "seconds", ...}]}. Every process is
    stopped and the temporary state removed at the end, unless --keep.
    """
    from memfed.cli import demo_network

    work = Path(tempfile.mkdtemp(prefix="memfed-demo-"))
    story = _Story(quiet=as_json)
    try:
        demo_network.run(story, work, model_dir, fast=fast)
    finally:
        if keep:
            if not as_json:
                console.print(f"kept demo state in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    names = tuple(s["name"] for s in story.steps)
    ok = names == demo_network.STEP_NAMES and all(s["ok"] for s in story.steps)
    if as_json:
        total = round(sum(s["seconds"] for s in story.steps), 2)
        extra = {"work_dir": str(work)} if keep else {}
        emit_json({"ok": ok, "seconds": total, "steps": story.steps, **extra})
    elif ok:
        console.print(f"[bold green]demo complete[/] in {sum(s['seconds'] for s in story.steps):.1f} s")
    return 0 if ok else 1
