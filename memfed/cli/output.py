"""Output for the CLI: rich text for people, one JSON document for scripts (``--json``)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

# Human output goes to stderr when --json is on, so stdout stays one parseable document.
console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def emit_json(data: Any) -> None:
    """Print ``data`` as the command's single JSON document on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


@contextmanager
def progress_bar(description: str, *, quiet: bool = False) -> Iterator[Any]:
    """A rich progress bar on stderr; yields ``update(done, total)``. Silent when ``quiet``."""
    if quiet:
        yield lambda done, total: None
        return
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    ) as progress:
        task = progress.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update


def print_cubes(manifests: Iterable[Any], *, as_json: bool, where: str) -> None:
    """The cube listing of `memfed cube list` and `memfed module list`: a table, or {"cubes": [...]}.

    ``where`` names the holder in the empty message ("the store", "the node")."""
    from rich.table import Table

    from memfed.cube.manifest import kind_name, lifecycle_name

    rows = [
        {
            "cube_id": m.cube_id,
            "version": m.version,
            "kind": kind_name(m.kind),
            "lifecycle": lifecycle_name(m.lifecycle),
            "size_bytes": m.payload.size_bytes,
            "digest": m.digest,
        }
        for m in manifests
    ]
    if as_json:
        emit_json({"cubes": rows})
        return
    if not rows:
        console.print(f"{where} holds no cubes")
        return
    table = Table("cube", "version", "kind", "lifecycle", "size", "digest")
    for r in rows:
        size = f"{r['size_bytes'] / 1e6:.2f} MB"
        table.add_row(r["cube_id"], r["version"], r["kind"], r["lifecycle"], size, r["digest"][:19] + "…")
    console.print(table)
