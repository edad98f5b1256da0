"""The owner's record of whom it sealed what for: what watermark detection searches.

One JSON object per line in ``<identity dir>/exports.jsonl``, appended (and fsynced) at each export.
It holds no secret: the watermark patterns are re-derived from the owner's key and each ``mark_id``.
JSON lines rather than SQLite: append-only, human-readable, and small (one line per export).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from memfed.errors import StorageError

LEDGER_FILE = "exports.jsonl"


@dataclass(frozen=True)
class ExportRecord:
    mark_id: str  # the recipient id (or group id) the watermark pattern is keyed on
    recipients: list[str]  # recipient ids the file was sealed for
    cube_ref: str
    source_digest: str  # the unmarked payload in the owner's store
    marked_digest: str  # the payload as exported
    scheme: str
    fingerprints: list[str] = field(default_factory=list)
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())


def append(directory: Path, record: ExportRecord) -> None:
    path = Path(directory) / LEDGER_FILE
    line = json.dumps(asdict(record), sort_keys=True) + "\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise StorageError(f"cannot record the export in {path}: {exc.strerror}") from exc


def records(directory: Path) -> list[ExportRecord]:
    """Every export recorded (a damaged line is skipped rather than hiding all the others)."""
    path = Path(directory) / LEDGER_FILE
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise StorageError(f"cannot read export ledger {path}: {exc.strerror}") from exc
    out = []
    for line in lines:
        try:
            out.append(ExportRecord(**json.loads(line)))
        except (ValueError, TypeError):
            continue
    return out
