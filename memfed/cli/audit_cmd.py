"""``memfed audit``: read and verify the registry's hash-chained audit log."""

from __future__ import annotations

from pathlib import Path

import click

from memfed.cli.options import json_option
from memfed.cli.output import console, emit_json
from memfed.cli.registry_cmd import _registry_dir, db_option, registry_dir_option


@click.group()
def audit() -> None:
    """The registry's audit log: every allow and deny, hash-chained."""


@audit.command("verify")
@registry_dir_option
@db_option
@json_option
def verify_cmd(registry_dir: Path | None, db_url: str | None, as_json: bool) -> None:
    """Walk the chain; exit 6 naming the first edited, deleted or missing entry."""
    from memfed.errors import IntegrityError
    from memfed.registry.core import Registry

    reg = Registry.open(_registry_dir(registry_dir), db_url=db_url)
    try:
        result = reg.verify_audit()
    finally:
        reg.close()
    if as_json:
        emit_json(result.to_dict())
    if not result.ok:
        raise IntegrityError(f"the audit log is broken: {result.problem}", hint="restore it from a backup")
    if not as_json:
        console.print(f"audit log intact: {result.entries} entries, head {result.head.hex()[:16]}…")


@audit.command("show")
@registry_dir_option
@db_option
@click.option("--from", "from_seq", type=int, default=1, show_default=True)
@click.option("--limit", type=int, default=50, show_default=True)
@json_option
def show_cmd(registry_dir: Path | None, db_url: str | None, from_seq: int, limit: int, as_json: bool) -> None:
    """Print audit entries."""
    from memfed.registry.core import Registry

    reg = Registry.open(_registry_dir(registry_dir), db_url=db_url)
    try:
        entries = reg.audit_entries(from_seq, limit)
    finally:
        reg.close()
    rows = [
        {
            "sequence": e.sequence,
            "at_us": e.at_us,
            "principal": e.principal,
            "action": e.action,
            "cube_id": e.cube_id,
            "allowed": e.allowed,
            "reason": e.reason,
        }
        for e in entries
    ]
    if as_json:
        emit_json({"entries": rows})
        return
    for r in rows:
        verdict = "[green]allow[/]" if r["allowed"] else "[red]deny[/]"
        console.print(
            f"{r['sequence']:>6} {verdict} {r['principal']} {r['action']} {r['cube_id']}: {r['reason']}"
        )
