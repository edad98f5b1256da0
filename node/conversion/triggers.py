"""Triggers: which plaintext memories to internalize, and a setting that internalizes them on its own.

The MemOS rule: text that is read often (more than ``min_per_hour`` accesses an hour, 10 by default) and
is stable (no version changed it by 5% or more) is better served from weights. The plaintext vault counts
every read (its searches, including the ones the MemScheduler's routing makes, and ``get``) and computes
the hot, stable documents (``PlaintextMemory.hot_docs``); a *proposal* is such a document whose current
text no live cube has internalized yet (an internalized cube's origin links each source by its digest,
so an edited text is proposed again).

``AutoInternalizer`` is the node setting: when ``enabled``, each ``tick`` internalizes up to
``max_per_tick`` proposals. A proposal that fails the recall gate (or states no checkable fact) is
remembered (by digest) and not retried until its text changes.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from memfed.cube.manifest import parse_semver, semver_key
from memfed.errors import InvalidArgumentError
from memfed.mip.v1 import cube_pb2
from memfed.node.conversion.documents import parse_document
from memfed.node.conversion.internalize import (
    METHOD,
    InternalizeSettings,
    RecallGateError,
    internalize,
    parse_source_ref,
)

if TYPE_CHECKING:
    import torch

    from memfed.node.plaintext import PlaintextMemory
    from memfed.node.runtime import ModuleRuntime
    from memfed.node.scheduler import MemScheduler
    from memfed.node.store import CubeStore

_DEAD_STATES = (cube_pb2.LIFECYCLE_STATE_ARCHIVED, cube_pb2.LIFECYCLE_STATE_EXPIRED)


@dataclass(frozen=True)
class Proposal:
    """A hot, stable plaintext memory that no live cube has internalized in its current form."""

    doc_id: str
    title: str
    accesses_per_hour: float
    versions: int
    max_change_fraction: float
    digest: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def internalized_sources(store: CubeStore) -> dict[str, set[str]]:
    """doc_id -> text digests that a live (not archived or expired) internalized cube was made from."""
    out: dict[str, set[str]] = {}
    for m in store.list():
        if m.origin.method != METHOD or m.lifecycle in _DEAD_STATES:
            continue
        for source in m.origin.sources:
            parsed = parse_source_ref(source)
            if parsed is not None:
                out.setdefault(parsed[0], set()).add(parsed[1])
    return out


def proposals(
    vault: PlaintextMemory,
    store: CubeStore | None = None,
    *,
    min_per_hour: float = 10.0,
    max_change: float = 0.05,
    window_s: float = 3600.0,
    now: float | None = None,
) -> list[Proposal]:
    """Hot, stable active documents not yet internalized in their current form, hottest first."""
    done = internalized_sources(store) if store is not None else {}
    out = []
    for hot in vault.hot_docs(min_per_hour, max_change, now, window_s=window_s):
        doc = vault.get(hot.doc_id, count_access=False)
        digest = parse_document(doc.text, doc_id=doc.doc_id, title=doc.title).digest
        if digest in done.get(doc.doc_id, ()):
            continue
        out.append(
            Proposal(
                hot.doc_id, hot.title, hot.accesses_per_hour, hot.versions, hot.max_change_fraction, digest
            )
        )
    return out


def scheduler_proposals(scheduler: MemScheduler, **kwargs: Any) -> list[Proposal]:
    """``proposals`` over a MemScheduler's plaintext memory and cube store (its access counters)."""
    if scheduler.plaintext is None:
        return []
    return proposals(scheduler.plaintext, scheduler.store, **kwargs)


def cube_id_for(doc_id: str) -> str:
    """A stable cube id for a document: ``plain.<doc id with other characters as '_'>``."""
    return "plain." + (re.sub(r"[^A-Za-z0-9_.-]+", "_", doc_id).strip("_.-") or "doc")[:120]


def next_version(store: CubeStore, cube_id: str) -> str:
    """1.0.0 for a new cube id, else the newest stored version with its minor number raised."""
    versions = store.versions(cube_id) if store.has(cube_id) else []
    if not versions:
        return "1.0.0"
    major, minor, _, _ = parse_semver(max(versions, key=semver_key))
    return f"{major}.{minor + 1}.0"


@dataclass(frozen=True)
class AutoInternalizeSettings:
    """The node setting. Off by default: internalizing costs CPU minutes and changes what answers."""

    enabled: bool = False
    min_per_hour: float = 10.0
    max_change: float = 0.05
    window_s: float = 3600.0
    max_per_tick: int = 1
    internalize: InternalizeSettings = field(default_factory=InternalizeSettings)


@dataclass
class TickOutcome:
    doc_id: str
    cube_ref: str
    registered: bool
    reason: str = ""
    report: dict[str, Any] = field(default_factory=dict)


class AutoInternalizer:
    """Internalizes proposals when the setting is on; call ``tick`` now and then (e.g. once a minute)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        store: CubeStore,
        vault: PlaintextMemory,
        settings: AutoInternalizeSettings | None = None,
        *,
        runtime: ModuleRuntime | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.model, self.tokenizer, self.store, self.vault = model, tokenizer, store, vault
        self.settings = settings or AutoInternalizeSettings()
        self.runtime = runtime
        self.clock = clock
        self.failed: set[tuple[str, str]] = set()  # (doc_id, digest) that failed the gate

    def tick(self, now: float | None = None) -> list[TickOutcome]:
        s = self.settings
        if not s.enabled:
            return []
        now = self.clock() if now is None else now
        todo = [
            p
            for p in proposals(
                self.vault,
                self.store,
                min_per_hour=s.min_per_hour,
                max_change=s.max_change,
                window_s=s.window_s,
                now=now,
            )
            if (p.doc_id, p.digest) not in self.failed
        ]
        out = []
        for p in todo[: s.max_per_tick]:
            doc = self.vault.get(p.doc_id, count_access=False)
            cube_id = cube_id_for(p.doc_id)
            version = next_version(self.store, cube_id)
            document = parse_document(doc.text, doc_id=doc.doc_id, title=doc.title)
            try:
                report, _ = internalize(
                    self.model,
                    self.tokenizer,
                    [document],
                    cube_id=cube_id,
                    version=version,
                    store=self.store,
                    vault=self.vault,
                    settings=s.internalize,
                    runtime=self.runtime,
                )
            except RecallGateError as exc:
                self.failed.add((p.doc_id, p.digest))
                out.append(TickOutcome(p.doc_id, exc.report.ref, False, exc.message, exc.report.to_dict()))
                continue
            except InvalidArgumentError as exc:  # e.g. text that states no fact the gate could check
                self.failed.add((p.doc_id, p.digest))
                out.append(TickOutcome(p.doc_id, f"{cube_id}@{version}", False, exc.message))
                continue
            out.append(TickOutcome(p.doc_id, report.ref, True, report=report.to_dict()))
        return out
