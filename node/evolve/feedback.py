"""User feedback on a module's answers, kept durably per node: the evolver's training material.

One SQLite file per node store (``<store>/feedback.db``), WAL-journaled so the service can record
feedback while the evolver reads it. Three tables:

- ``feedback``: one row per judgement (who, which cube and version, prompt, answer, good/bad, an
  optional correction, when); ``used_by`` names the promotion that consumed it for training.
- ``decisions``: every ``Evolver.step`` outcome (promoted, discarded, rolled back, waiting) with its
  reason and figures, so "why did this module change" is answerable later.
- ``validation``: a module's validation set when the caller provides one explicitly (otherwise the
  evolver derives it from the cube's origin: see ``memfed.node.evolve.validation``).

``add`` checks everything before it writes, and the rate-limit count and the insert happen in one write
transaction, so a refused item changes nothing and two concurrent writers cannot both slip under the
limit.
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from memfed.cube.manifest import check_cube_id, parse_semver
from memfed.errors import CapacityError, InvalidArgumentError, NotFoundError, StorageError
from memfed.node.conversion.augment import Probe
from memfed.node.evolve.settings import ACTIONS, EvolveDecision, EvolveSettings

if TYPE_CHECKING:
    from memfed.node.store import CubeStore

MAX_TEXT_CHARS = 4096  # prompt, answer and correction each; a feedback item is a judgement, not a document
MAX_PRINCIPAL_CHARS = 256
RATE_WINDOW_S = 3600.0
FEEDBACK_DB = "feedback.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    cube_id TEXT NOT NULL, version TEXT, principal TEXT NOT NULL,
    prompt TEXT NOT NULL, answer TEXT NOT NULL, good INTEGER NOT NULL, correction TEXT,
    at REAL NOT NULL, used_by INTEGER
);
CREATE INDEX IF NOT EXISTS feedback_by_cube ON feedback (cube_id, used_by, id);
CREATE INDEX IF NOT EXISTS feedback_by_principal ON feedback (principal, at);
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    cube_id TEXT NOT NULL, action TEXT NOT NULL, reason TEXT NOT NULL,
    from_version TEXT, to_version TEXT, figures TEXT NOT NULL, at REAL NOT NULL, last_item INTEGER
);
CREATE INDEX IF NOT EXISTS decisions_by_cube ON decisions (cube_id, id);
CREATE TABLE IF NOT EXISTS validation (
    cube_id TEXT NOT NULL, prompt TEXT NOT NULL, answer TEXT NOT NULL, subject TEXT NOT NULL,
    relation TEXT NOT NULL, PRIMARY KEY (cube_id, prompt)
);
"""
_FEEDBACK_COLUMNS = "id, cube_id, version, principal, prompt, answer, good, correction, at, used_by"
_DECISION_COLUMNS = "id, cube_id, action, reason, from_version, to_version, figures, at"
_SPACES = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """An answer as compared and trained: single spaces, no surrounding blanks or final period.

    "Quorn", " Quorn." and "Quorn " are one answer; the model is taught and scored on the bare words.
    """
    return _SPACES.sub(" ", text).strip().rstrip(".").strip()


def normalize_prompt(text: str) -> str:
    """A prompt as grouped: surrounding blanks removed (inner newlines matter to the question format)."""
    return text.strip()


@dataclass(frozen=True)
class FeedbackItem:
    """One user's judgement of one answer. ``version`` None: the cube's current version when recorded."""

    cube_id: str
    principal: str
    prompt: str
    answer: str
    good: bool
    correction: str | None = None
    version: str | None = None


@dataclass(frozen=True)
class StoredFeedback:
    """A recorded feedback item: the item as normalized, its row id, time, and the promotion that used it."""

    id: int
    cube_id: str
    version: str | None
    principal: str
    prompt: str
    answer: str
    good: bool
    correction: str | None
    at: float
    used_by: int | None


def check_item(item: FeedbackItem) -> FeedbackItem:
    """The item normalized, or InvalidArgumentError saying what is wrong (nothing is written here)."""
    try:
        check_cube_id(item.cube_id)
        if item.version is not None:
            parse_semver(item.version)
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"feedback names {exc.message}", hint=exc.hint) from exc
    principal = (item.principal or "").strip()
    if not principal or len(principal) > MAX_PRINCIPAL_CHARS:
        raise InvalidArgumentError(
            f"feedback needs the principal who gives it (1-{MAX_PRINCIPAL_CHARS} characters)",
            hint="authenticate the caller; its principal is recorded with every item",
        )
    prompt, answer = normalize_prompt(item.prompt or ""), normalize_answer(item.answer or "")
    correction = None if item.correction is None else normalize_answer(item.correction)
    for name, text in (("prompt", prompt), ("answer", answer), ("correction", correction)):
        if text is None:
            continue
        if not text:
            raise InvalidArgumentError(
                f"feedback {name} is empty", hint=f"give the {name} the judgement is about"
            )
        if len(text) > MAX_TEXT_CHARS:
            raise InvalidArgumentError(
                f"feedback {name} has {len(text):,} characters; the limit is {MAX_TEXT_CHARS:,}",
                hint="send the question and the module's answer, not a document",
            )
    if item.good and correction is not None:
        raise InvalidArgumentError(
            "feedback marks the answer good but also gives a correction",
            hint="use --bad with --correction to say what the answer should have been",
        )
    if correction is not None and correction.casefold() == answer.casefold():
        raise InvalidArgumentError(
            "the correction repeats the answer marked bad",
            hint="give the right answer as --correction, or leave it out",
        )
    return FeedbackItem(item.cube_id, principal, prompt, answer, bool(item.good), correction, item.version)


class FeedbackLog:
    """Durable per-node feedback, evolve decisions and explicit validation sets. Thread-safe.

    ``store``: when given, ``add`` refuses feedback for a cube (or version) the store does not hold and
    resolves a missing version to the cube's current one, which the regression check after a promotion
    needs. ``clock`` gives Unix seconds (injectable for tests of the rate limit).
    """

    def __init__(
        self,
        path: Path | str,
        *,
        settings: EvolveSettings | None = None,
        clock: Callable[[], float] = time.time,
        store: CubeStore | None = None,
        busy_timeout_s: float = 30.0,
    ) -> None:
        self.path = Path(path)
        self.settings = settings or EvolveSettings()
        self.settings.check()
        self.store = store
        self._clock = clock
        self._lock = threading.RLock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # Autocommit; write transactions are begun explicitly (BEGIN IMMEDIATE takes the lock up front).
            self._conn = sqlite3.connect(
                self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open feedback log {self.path}: {exc}") from exc
        try:
            if str(self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]).lower() != "wal":
                raise StorageError(
                    f"feedback log {self.path} cannot use WAL journaling",
                    hint="keep it on a local filesystem",
                )
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(_SCHEMA)
        except (sqlite3.Error, StorageError) as exc:
            self._conn.close()  # a log that cannot be used leaves no open connection behind
            if isinstance(exc, StorageError):
                raise
            raise StorageError(f"cannot open feedback log {self.path}: {exc}") from exc

    # -- plumbing ---------------------------------------------------------------------------------------

    @contextmanager
    def _tx(self, doing: str, *, write: bool) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                if write:
                    self._conn.execute("BEGIN IMMEDIATE")
                yield self._conn
                if write:
                    self._conn.execute("COMMIT")
            except BaseException as exc:
                if write:
                    with contextlib.suppress(sqlite3.Error):
                        self._conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StorageError(f"feedback log {self.path}: {doing} failed: {exc}") from exc
                raise

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> FeedbackLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- feedback ---------------------------------------------------------------------------------------

    def add(self, item: FeedbackItem) -> int:
        """Record ``item``; its row id. Refused, with nothing written: InvalidArgumentError (empty or
        oversized text, a good answer with a correction, a correction equal to the answer),
        NotFoundError (a cube or version the store does not hold) or CapacityError (the principal gave
        ``rate_limit_per_hour`` items in the last hour)."""
        item = check_item(item)
        version = self._resolve_version(item.cube_id, item.version)
        limit = self.settings.rate_limit_per_hour
        with self._tx("recording feedback", write=True) as conn:
            now = self._clock()
            (recent,) = conn.execute(
                "SELECT COUNT(*) FROM feedback WHERE principal = ? AND at > ?",
                (item.principal, now - RATE_WINDOW_S),
            ).fetchone()
            if recent >= limit:
                raise CapacityError(
                    f"principal {item.principal!r} gave {recent} feedback items in the last hour; "
                    f"the limit is {limit}",
                    hint="wait before sending more feedback",
                )
            cur = conn.execute(
                "INSERT INTO feedback (cube_id, version, principal, prompt, answer, good, correction, at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (item.cube_id, version, item.principal, item.prompt, item.answer, int(item.good),
                 item.correction, now),
            )  # fmt: skip
            return int(cur.lastrowid or 0)

    def _resolve_version(self, cube_id: str, version: str | None) -> str | None:
        if self.store is None:
            return version
        if version is None:
            current = self.store.current_version(cube_id)  # NotFoundError: no such cube
            if current is None:
                raise NotFoundError(
                    f"every version of cube {cube_id!r} is archived or expired; there is no answer to judge",
                    hint=f"restore a version first (memfed module restore {cube_id}@VERSION)",
                )
            return current
        if not self.store.has(cube_id, version):
            raise NotFoundError(
                f"no cube {cube_id}@{version} in this node's store",
                hint="give feedback on a version this node serves",
            )
        return version

    def pending(self, cube_id: str) -> list[StoredFeedback]:
        """Feedback on ``cube_id`` that no promotion has trained on yet, oldest first."""
        return self._feedback("WHERE cube_id = ? AND used_by IS NULL", (cube_id,))

    def on_version(self, cube_id: str, version: str) -> list[StoredFeedback]:
        """Every item given on ``cube_id@version`` (used or not), oldest first: its live record."""
        return self._feedback("WHERE cube_id = ? AND version = ?", (cube_id, version))

    def _feedback(self, where: str, params: tuple[object, ...]) -> list[StoredFeedback]:
        with self._tx("reading feedback", write=False) as conn:
            rows = conn.execute(f"SELECT {_FEEDBACK_COLUMNS} FROM feedback {where} ORDER BY id", params)
            return [
                StoredFeedback(i, c, v, p, q, a, bool(g), k, t, u) for i, c, v, p, q, a, g, k, t, u in rows
            ]

    # -- decisions --------------------------------------------------------------------------------------

    def record(
        self, decision: EvolveDecision, *, last_item: int | None = None, consumed: Sequence[int] = ()
    ) -> EvolveDecision:
        """Store ``decision`` (and mark ``consumed`` feedback as used by it) in one transaction; the
        decision with its id and time. ``last_item``: the newest feedback id the decision looked at."""
        if decision.action not in ACTIONS:
            raise InvalidArgumentError(f"unknown evolve action {decision.action!r}")
        with self._tx("recording a decision", write=True) as conn:
            now = self._clock()
            last = conn.execute(
                "SELECT id, action FROM decisions WHERE cube_id = ? ORDER BY id DESC LIMIT 1",
                (decision.cube_id,),
            ).fetchone()
            if decision.action == "waiting" and last is not None and last[1] == "waiting":
                # A cube polled while it waits would grow a row per poll: the latest wait replaces the last.
                conn.execute("DELETE FROM decisions WHERE id = ?", (last[0],))
            cur = conn.execute(
                "INSERT INTO decisions (cube_id, action, reason, from_version, to_version, figures, at, "
                "last_item) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (decision.cube_id, decision.action, decision.reason, decision.from_version,
                 decision.to_version, json.dumps(decision.figures, sort_keys=True), now, last_item),
            )  # fmt: skip
            row_id = int(cur.lastrowid or 0)
            conn.executemany(
                "UPDATE feedback SET used_by = ? WHERE id = ? AND used_by IS NULL",
                [(row_id, i) for i in consumed],
            )
        return EvolveDecision(
            decision.cube_id, decision.action, decision.reason, decision.from_version, decision.to_version,
            dict(decision.figures), row_id, now,
        )  # fmt: skip

    def decisions(self, cube_id: str, action: str | None = None) -> list[EvolveDecision]:
        """Recorded decisions for ``cube_id`` (only ``action`` ones when given), oldest first."""
        sql = f"SELECT {_DECISION_COLUMNS} FROM decisions WHERE cube_id = ?"
        params: tuple[str, ...] = (cube_id,)
        if action is not None:
            sql, params = sql + " AND action = ?", (cube_id, action)
        with self._tx("reading decisions", write=False) as conn:
            rows = conn.execute(sql + " ORDER BY id", params).fetchall()
        return [
            EvolveDecision(c, a, r, f, t, json.loads(fig), i, at)  # type: ignore[arg-type]
            for i, c, a, r, f, t, fig, at in rows
        ]

    def last_attempt_item(self, cube_id: str) -> int:
        """The newest feedback id a training attempt (promoted or discarded) has looked at; 0 if none."""
        with self._tx("reading decisions", write=False) as conn:
            (last,) = conn.execute(
                "SELECT MAX(last_item) FROM decisions WHERE cube_id = ? AND action IN ('promoted', "
                "'discarded')",
                (cube_id,),
            ).fetchone()
        return int(last or 0)

    # -- explicit validation sets -----------------------------------------------------------------------

    def set_validation(self, cube_id: str, probes: Sequence[Probe]) -> None:
        """Make ``probes`` the validation set of ``cube_id`` (replacing any earlier one)."""
        check_cube_id(cube_id)
        with self._tx("storing a validation set", write=True) as conn:
            conn.execute("DELETE FROM validation WHERE cube_id = ?", (cube_id,))
            conn.executemany(
                "INSERT OR REPLACE INTO validation VALUES (?, ?, ?, ?, ?)",
                [(cube_id, p.prompt, p.answer, p.subject, p.relation) for p in probes],
            )

    def validation(self, cube_id: str) -> list[Probe]:
        """The validation set stored for ``cube_id`` with ``set_validation`` ([] when none)."""
        with self._tx("reading a validation set", write=False) as conn:
            rows = conn.execute(
                "SELECT prompt, answer, subject, relation FROM validation WHERE cube_id = ? ORDER BY rowid",
                (cube_id,),
            ).fetchall()
        return [Probe(*row) for row in rows]
