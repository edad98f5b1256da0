"""Plaintext memory: a local, versioned retrieval index of text memories (SQLite FTS5, BM25).

Documents are keyed by ``doc_id``. Re-adding a document with different text makes a new version and
records how much the text changed (``change_fraction``: 1 - difflib's word-level similarity ratio, so 0.0
is unchanged and 1.0 is entirely new). Knowledge whose versions all changed by less than 5% is *stable*.

Every search hit and every ``get`` counts an access (one row per access, with its time). A document that
is read often (``access_rate``, accesses per hour over a window) and is stable is *hot*: ``hot_docs``
lists those as proposals to internalize into parameters (the MemScheduler decides; nothing here acts).

Statuses: ``active`` (searchable), ``pending_review`` (text written back from weights, awaiting a person),
``archived`` (kept, not searched). Search covers active documents unless asked otherwise.

Search text is user text: it is never passed to FTS5 as a query expression. It is split into word tokens,
each quoted as an FTS5 string, and the tokens are OR-ed, so ``AND (`` or a lone ``"`` is just words.
Scores are BM25 (FTS5's ``bm25()``, title weighted 2x), negated so that higher is better.

Settings: WAL journaling (readers do not block the writer), ``synchronous=NORMAL`` by default (a power cut
may lose the last commits, never corrupt the file), explicit ``BEGIN IMMEDIATE`` write transactions. One
connection, shared by all threads behind a lock.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from memfed.errors import InvalidArgumentError, NotFoundError, StorageError
from memfed.node.facts import open_book_prompt, question_prompt

STATUSES = ("active", "pending_review", "archived")
STABLE_CHANGE = 0.05  # versions that changed less than this are "stable"
DEFAULT_MAX_PROMPT_CHARS = 1500
MAX_DOC_ID_CHARS = 256
MAX_QUERY_TOKENS = 32
MAX_K = 1000
SCHEMA_VERSION = 1
DEFAULT_ACCESS_RETENTION_S = 7 * 24 * 3600.0
_PRUNE_EVERY = 1000  # access rows written between automatic prunes
_DIFF_BUDGET = 1_000_000  # word pairs difflib may compare in change_fraction

_SCHEMA_V1 = """
CREATE TABLE docs (
    id          INTEGER PRIMARY KEY,       -- stable rowid: the FTS index refers to it
    doc_id      TEXT    NOT NULL UNIQUE,
    title       TEXT    NOT NULL,
    text        TEXT    NOT NULL,
    tags        TEXT    NOT NULL,          -- JSON array of strings
    source      TEXT    NOT NULL,
    status      TEXT    NOT NULL,
    version     INTEGER NOT NULL,
    created_at  REAL    NOT NULL,          -- Unix seconds
    updated_at  REAL    NOT NULL
);
CREATE INDEX docs_by_status ON docs (status);

CREATE TABLE doc_versions (
    doc_id          TEXT    NOT NULL REFERENCES docs (doc_id) ON DELETE CASCADE,
    version         INTEGER NOT NULL,
    title           TEXT    NOT NULL,
    text            TEXT    NOT NULL,
    change_fraction REAL    NOT NULL,      -- vs. the previous version; 0.0 for version 1
    created_at      REAL    NOT NULL,
    PRIMARY KEY (doc_id, version)
);

CREATE TABLE accesses (
    doc_id  TEXT NOT NULL REFERENCES docs (doc_id) ON DELETE CASCADE,
    at      REAL NOT NULL                  -- Unix seconds
);
CREATE INDEX accesses_by_doc ON accesses (doc_id, at);
CREATE INDEX accesses_by_time ON accesses (at);

CREATE VIRTUAL TABLE docs_fts USING fts5 (
    title, text, content='docs', content_rowid='id', tokenize='unicode61 remove_diacritics 2'
);
CREATE TRIGGER docs_fts_insert AFTER INSERT ON docs BEGIN
    INSERT INTO docs_fts (rowid, title, text) VALUES (new.id, new.title, new.text);
END;
CREATE TRIGGER docs_fts_delete AFTER DELETE ON docs BEGIN
    INSERT INTO docs_fts (docs_fts, rowid, title, text) VALUES ('delete', old.id, old.title, old.text);
END;
CREATE TRIGGER docs_fts_update AFTER UPDATE OF title, text ON docs BEGIN
    INSERT INTO docs_fts (docs_fts, rowid, title, text) VALUES ('delete', old.id, old.title, old.text);
    INSERT INTO docs_fts (rowid, title, text) VALUES (new.id, new.title, new.text);
END;
"""

_TOKEN = re.compile(r"[^\W_]+")  # letters and digits: what FTS5's unicode61 tokenizer keeps
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n")


@dataclass(frozen=True)
class PlaintextDoc:
    """A document's current version."""

    doc_id: str
    title: str
    text: str
    tags: tuple[str, ...]
    source: str
    status: str
    version: int
    change_fraction: float  # of the current version vs. the previous one (0.0 for version 1)
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class DocVersion:
    doc_id: str
    version: int
    title: str
    text: str
    change_fraction: float
    created_at: float


@dataclass(frozen=True)
class Hit:
    """One search result. ``score`` is BM25 relevance, higher is better (only comparable within a query)."""

    doc_id: str
    title: str
    text: str
    snippet: str
    score: float


@dataclass(frozen=True)
class HotDoc:
    """A proposal to internalize: read at least ``min_per_hour`` and stable across its versions."""

    doc_id: str
    title: str
    accesses_per_hour: float
    versions: int
    max_change_fraction: float  # the largest change between consecutive versions (0.0 for one version)


def change_fraction(old: str, new: str) -> float:
    """How much ``new`` differs from ``old``, in [0, 1]: 1 - 2·matched / total, counted in words.

    Two levels, so a long document with a few edits is compared quickly and exactly: the texts are
    first aligned sentence by sentence (lines and ``.!?`` ends), then the words of each replaced run of
    sentences are aligned (difflib). Whitespace-only edits are no change.
    """
    if old == new:
        return 0.0
    units_a, units_b = _units(old), _units(new)
    total = sum(map(len, units_a)) + sum(map(len, units_b))
    if total == 0:
        return 0.0
    matched = 0
    for tag, i1, i2, j1, j2 in _opcodes(units_a, units_b):
        if tag == "equal":
            matched += sum(len(u) for u in units_a[i1:i2])
        elif tag == "replace":
            words_a = [w for u in units_a[i1:i2] for w in u]
            words_b = [w for u in units_b[j1:j2] for w in u]
            matched += sum(i2 - i1 for tag, i1, i2, _, _ in _opcodes(words_a, words_b) if tag == "equal")
    return max(0.0, 1.0 - 2.0 * matched / total)


def _units(text: str) -> list[tuple[str, ...]]:
    return [tuple(words) for part in _SENTENCE_END.split(text) if (words := part.split())]


def _opcodes(a: Sequence, b: Sequence) -> list[tuple[str, int, int, int, int]]:
    """difflib opcodes, with the common head and tail matched first (edits are usually local).

    autojunk=False is exact but quadratic on repetitive input; it is kept for middles of bounded size
    (this runs inside the write lock), beyond that difflib's popular-element heuristic takes over.
    """
    n = min(len(a), len(b))
    head = 0
    while head < n and a[head] == b[head]:
        head += 1
    tail = 0
    while tail < n - head and a[len(a) - 1 - tail] == b[len(b) - 1 - tail]:
        tail += 1
    mid_a, mid_b = a[head : len(a) - tail], b[head : len(b) - tail]
    ops: list[tuple[str, int, int, int, int]] = [("equal", 0, head, 0, head)] if head else []
    if mid_a or mid_b:
        matcher = difflib.SequenceMatcher(None, mid_a, mid_b, autojunk=len(mid_a) * len(mid_b) > _DIFF_BUDGET)
        ops += [
            (t, i1 + head, i2 + head, j1 + head, j2 + head) for t, i1, i2, j1, j2 in matcher.get_opcodes()
        ]
    if tail:
        ops.append(("equal", len(a) - tail, len(a), len(b) - tail, len(b)))
    return ops


def fts_query(text: str, *, max_tokens: int = MAX_QUERY_TOKENS) -> str | None:
    """User text as a safe FTS5 query: each word quoted as a string, the words OR-ed; None if no word."""
    seen: dict[str, None] = {}
    for token in _TOKEN.findall(text.lower()):
        seen.setdefault(token, None)
        if len(seen) >= max_tokens:
            break
    if not seen:
        return None
    return " OR ".join('"' + token.replace('"', '""') + '"' for token in seen)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def augment_prompt(question: str, hits: Sequence[Hit], max_chars: int = DEFAULT_MAX_PROMPT_CHARS) -> str:
    """The open-book prompt (``facts.open_book_prompt``) with the hits' texts, best first, as the passage.

    The passage is one line (the format the embedded model was taught), cut at a word boundary to at most
    ``max_chars`` characters. With no hits it is the closed-book question prompt.
    """
    if not isinstance(question, str) or not question.strip():
        raise InvalidArgumentError("question must be non-empty text")
    if max_chars < 1:
        raise InvalidArgumentError(f"max_chars must be >= 1, not {max_chars}")
    passage = _one_line(" ".join(hit.text for hit in hits))
    if len(passage) > max_chars:
        cut = passage[: max_chars + 1]
        space = cut.rfind(" ")
        passage = cut[:space] if space > 0 else passage[:max_chars]
    passage = passage.strip()
    question = question.strip()
    return open_book_prompt(passage, question) if passage else question_prompt(question)


def _storage_error(exc: sqlite3.Error, path: str, doing: str) -> StorageError:
    text = str(exc)
    lowered = text.lower()
    if "locked" in lowered or "busy" in lowered:
        hint = "another process held the plaintext memory's write lock too long; retry"
    elif "full" in lowered:
        hint = "free disk space and retry"
    elif "not a database" in lowered or "malformed" in lowered or "corrupt" in lowered:
        hint = "the file is damaged: restore it from a backup"
    elif "readonly" in lowered or "unable to open" in lowered:
        hint = "check the directory's permissions and that its filesystem is writable"
    else:
        hint = None
    return StorageError(f"plaintext memory {path}: {text} while {doing}", hint=hint)


def _check_doc_id(doc_id: object) -> str:
    if not isinstance(doc_id, str) or not doc_id.strip():
        raise InvalidArgumentError(f"doc_id must be a non-empty string, not {doc_id!r}")
    if len(doc_id) > MAX_DOC_ID_CHARS:
        raise InvalidArgumentError(f"doc_id is {len(doc_id)} characters; the limit is {MAX_DOC_ID_CHARS}")
    if doc_id != doc_id.strip() or any(ord(c) < 32 for c in doc_id):
        raise InvalidArgumentError(
            f"doc_id {doc_id!r} has surrounding whitespace or control characters",
            hint="use a plain identifier such as 'guide/dosage-2025'",
        )
    return doc_id


def _check_status(status: object) -> str:
    if status not in STATUSES:
        raise InvalidArgumentError(f"unknown status {status!r}", hint=f"use one of {', '.join(STATUSES)}")
    return str(status)


def _check_tags(tags: Iterable[str]) -> tuple[str, ...]:
    if isinstance(tags, str | bytes):
        raise InvalidArgumentError("tags must be a list of strings, not one string", hint=f"pass [{tags!r}]")
    out = tuple(tags)
    if not all(isinstance(t, str) and t for t in out):
        raise InvalidArgumentError(f"tags must be non-empty strings, got {out!r}")
    return out


class PlaintextMemory:
    """A versioned text-memory index in one SQLite file (or ``":memory:"``). Thread-safe.

    ``clock`` gives Unix seconds (injectable for tests); ``access_retention_s`` bounds how long access
    events are kept (older ones are pruned now and then; rates over longer windows undercount).
    """

    def __init__(
        self,
        path: Path | str,
        *,
        synchronous: str = "NORMAL",
        busy_timeout_s: float = 30.0,
        access_retention_s: float = DEFAULT_ACCESS_RETENTION_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if synchronous not in ("FULL", "NORMAL"):
            raise InvalidArgumentError(f"synchronous must be FULL or NORMAL, not {synchronous!r}")
        self.path = str(path)
        self._clock = clock
        self._retention_s = access_retention_s
        self._writes_since_prune = 0
        self._lock = threading.RLock()
        in_memory = self.path == ":memory:"
        if not in_memory:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            # isolation_level=None: autocommit; write transactions are begun and ended explicitly.
            self._conn = sqlite3.connect(
                self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise _storage_error(exc, self.path, "opening") from exc
        try:
            if not in_memory:
                mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise StorageError(
                        f"plaintext memory {self.path} cannot use WAL journaling (got {mode!r})",
                        hint="keep it on a local filesystem; network filesystems do not support WAL",
                    )
            self._conn.execute(f"PRAGMA synchronous={synchronous}")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.Error as exc:
            self._conn.close()
            raise _storage_error(exc, self.path, "opening") from exc
        except BaseException:
            self._conn.close()
            raise

    # -- plumbing ---------------------------------------------------------------------------------------

    def _migrate(self) -> None:
        current = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if current == SCHEMA_VERSION:
            return
        if current > SCHEMA_VERSION:
            raise StorageError(
                f"plaintext memory {self.path} has schema version {current}; this memfed reads up to "
                f"{SCHEMA_VERSION}",
                hint="upgrade memfed to open it",
            )
        with self._write("creating the schema"):
            for statement in _split_script(_SCHEMA_V1):
                self._conn.execute(statement)
            self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextmanager
    def _write(self, doing: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise _storage_error(exc, self.path, doing) from exc
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
                raise _storage_error(exc, self.path, doing) from exc
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
                raise

    @contextmanager
    def _read(self, doing: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._conn
            except sqlite3.Error as exc:
                raise _storage_error(exc, self.path, doing) from exc

    def _record_accesses(self, conn: sqlite3.Connection, doc_ids: Sequence[str], now: float) -> None:
        if not doc_ids:
            return
        conn.executemany("INSERT INTO accesses (doc_id, at) VALUES (?, ?)", [(d, now) for d in doc_ids])
        self._writes_since_prune += len(doc_ids)
        if self._writes_since_prune >= _PRUNE_EVERY:
            conn.execute("DELETE FROM accesses WHERE at < ?", (now - self._retention_s,))
            self._writes_since_prune = 0

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> PlaintextMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        with self._read("counting documents") as conn:
            return int(conn.execute("SELECT COUNT(*) FROM docs").fetchone()[0])

    # -- documents --------------------------------------------------------------------------------------

    def add(
        self,
        doc_id: str,
        text: str,
        *,
        title: str = "",
        tags: Iterable[str] = (),
        source: str = "",
        status: str = "active",
    ) -> PlaintextDoc:
        """Add a document, or replace it: title, tags, source and status become the given ones, and if the
        text differs a new version is recorded with its ``change_fraction``. Same text: no new version."""
        _check_doc_id(doc_id)
        if not isinstance(text, str) or not text.strip():
            raise InvalidArgumentError(f"document {doc_id!r} has no text", hint="there is nothing to index")
        if not isinstance(title, str) or not isinstance(source, str):
            raise InvalidArgumentError("title and source must be strings")
        tag_tuple = _check_tags(tags)
        _check_status(status)
        now = self._clock()
        with self._write(f"adding document {doc_id!r}") as conn:
            row = conn.execute("SELECT text, version FROM docs WHERE doc_id = ?", (doc_id,)).fetchone()
            fields = (title, text, json.dumps(list(tag_tuple)), source, status)
            if row is None:
                conn.execute(
                    "INSERT INTO docs (doc_id, title, text, tags, source, status, version, created_at, "
                    "updated_at) VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?)",
                    (doc_id, *fields, now, now),
                )
                conn.execute(
                    "INSERT INTO doc_versions VALUES (?, 1, ?, ?, 0.0, ?)", (doc_id, title, text, now)
                )
            else:
                old_text, version = row
                if old_text != text:
                    version += 1
                    conn.execute(
                        "INSERT INTO doc_versions VALUES (?, ?, ?, ?, ?, ?)",
                        (doc_id, version, title, text, change_fraction(old_text, text), now),
                    )
                conn.execute(
                    "UPDATE docs SET title = ?, text = ?, tags = ?, source = ?, status = ?, version = ?, "
                    "updated_at = ? WHERE doc_id = ?",
                    (*fields, version, now, doc_id),
                )
            return self._doc_locked(conn, doc_id)

    def get(self, doc_id: str, *, count_access: bool = True) -> PlaintextDoc:
        """The document's current version; counts an access unless ``count_access=False``."""
        _check_doc_id(doc_id)
        if not count_access:
            with self._read(f"reading document {doc_id!r}") as conn:
                return self._doc_locked(conn, doc_id)
        with self._write(f"reading document {doc_id!r}") as conn:
            doc = self._doc_locked(conn, doc_id)
            self._record_accesses(conn, [doc_id], self._clock())
            return doc

    def versions(self, doc_id: str) -> list[DocVersion]:
        """Every version of the document, oldest first."""
        _check_doc_id(doc_id)
        with self._read(f"reading versions of {doc_id!r}") as conn:
            rows = conn.execute(
                "SELECT doc_id, version, title, text, change_fraction, created_at FROM doc_versions "
                "WHERE doc_id = ? ORDER BY version",
                (doc_id,),
            ).fetchall()
        if not rows:
            raise _not_found(doc_id)
        return [DocVersion(*row) for row in rows]

    def delete(self, doc_id: str) -> None:
        """Remove the document, its versions and its access history."""
        _check_doc_id(doc_id)
        with self._write(f"deleting document {doc_id!r}") as conn:
            if conn.execute("DELETE FROM docs WHERE doc_id = ?", (doc_id,)).rowcount == 0:
                raise _not_found(doc_id)

    def set_status(self, doc_id: str, status: str) -> PlaintextDoc:
        """Move the document to ``active``, ``pending_review`` or ``archived`` (no new version)."""
        _check_doc_id(doc_id)
        _check_status(status)
        with self._write(f"setting the status of {doc_id!r}") as conn:
            cur = conn.execute(
                "UPDATE docs SET status = ?, updated_at = ? WHERE doc_id = ?", (status, self._clock(), doc_id)
            )
            if cur.rowcount == 0:
                raise _not_found(doc_id)
            return self._doc_locked(conn, doc_id)

    def list(self, status: str | None = None) -> list[PlaintextDoc]:
        """Documents (current versions) in ``doc_id`` order, all or those with one status."""
        sql = f"SELECT {_DOC_COLUMNS} FROM docs"
        params: tuple[str, ...] = ()
        if status is not None:
            params = (_check_status(status),)
            sql += " WHERE status = ?"
        with self._read("listing documents") as conn:
            return [_doc(row) for row in conn.execute(sql + " ORDER BY doc_id", params)]

    def _doc_locked(self, conn: sqlite3.Connection, doc_id: str) -> PlaintextDoc:
        row = conn.execute(f"SELECT {_DOC_COLUMNS} FROM docs WHERE doc_id = ?", (doc_id,)).fetchone()
        if row is None:
            raise _not_found(doc_id)
        return _doc(row)

    # -- retrieval --------------------------------------------------------------------------------------

    def search(self, query: str, k: int = 3, *, status: str | None = "active") -> list[Hit]:
        """The ``k`` best BM25 matches for the words of ``query`` among documents with ``status`` (None:
        any status). Each hit counts an access. A query with no words returns no hits."""
        if not isinstance(query, str):
            raise InvalidArgumentError(f"query must be text, not {type(query).__name__}")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
            raise InvalidArgumentError(f"k must be an int from 1 to {MAX_K}, not {k!r}")
        if status is not None:
            _check_status(status)
        match = fts_query(query)
        if match is None:
            return []
        sql = (
            "SELECT d.doc_id, d.title, d.text, snippet(docs_fts, 1, '', '', '…', 32), "
            "bm25(docs_fts, 2.0, 1.0) AS rank "
            "FROM docs_fts JOIN docs d ON d.id = docs_fts.rowid WHERE docs_fts MATCH ?"
        )
        params: list[object] = [match]
        if status is not None:
            sql += " AND d.status = ?"
            params.append(status)
        sql += " ORDER BY rank LIMIT ?"
        params.append(k)
        with self._write("searching") as conn:
            rows = conn.execute(sql, params).fetchall()
            hits = [Hit(doc_id, title, text, snippet, -rank) for doc_id, title, text, snippet, rank in rows]
            self._record_accesses(conn, [h.doc_id for h in hits], self._clock())
        return hits

    def prompt_with(
        self, hits: Sequence[Hit], question: str, *, max_chars: int = DEFAULT_MAX_PROMPT_CHARS
    ) -> str:
        """``augment_prompt(question, hits, max_chars)``."""
        return augment_prompt(question, hits, max_chars)

    def open_book(
        self, question: str, k: int = 3, *, max_chars: int = DEFAULT_MAX_PROMPT_CHARS
    ) -> tuple[str, list[Hit]]:
        """Search with the question and build the open-book prompt from the hits."""
        hits = self.search(question, k)
        return augment_prompt(question, hits, max_chars), hits

    # -- access statistics ------------------------------------------------------------------------------

    def access_rate(self, doc_id: str, window_s: float = 3600.0, now: float | None = None) -> float:
        """Accesses per hour to the document over the ``window_s`` seconds before ``now``."""
        _check_doc_id(doc_id)
        if not window_s > 0:
            raise InvalidArgumentError(f"window_s must be > 0, not {window_s!r}")
        now = self._clock() if now is None else now
        with self._read(f"reading accesses of {doc_id!r}") as conn:
            if conn.execute("SELECT 1 FROM docs WHERE doc_id = ?", (doc_id,)).fetchone() is None:
                raise _not_found(doc_id)
            (count,) = conn.execute(
                "SELECT COUNT(*) FROM accesses WHERE doc_id = ? AND at > ? AND at <= ?",
                (doc_id, now - window_s, now),
            ).fetchone()
        return count * 3600.0 / window_s

    def hot_docs(
        self,
        min_per_hour: float = 10.0,
        max_change: float = STABLE_CHANGE,
        now: float | None = None,
        *,
        window_s: float = 3600.0,
    ) -> list[HotDoc]:
        """Active documents read at least ``min_per_hour`` times an hour (over ``window_s``) whose every
        version changed less than ``max_change`` from the one before: candidates to internalize, hottest
        first. A document with a single version counts as stable."""
        if not window_s > 0:
            raise InvalidArgumentError(f"window_s must be > 0, not {window_s!r}")
        now = self._clock() if now is None else now
        min_count = min_per_hour * window_s / 3600.0
        with self._read("finding hot documents") as conn:
            rows = conn.execute(
                "SELECT d.doc_id, d.title, COUNT(*) AS n, d.version, "
                "  (SELECT COALESCE(MAX(v.change_fraction), 0.0) FROM doc_versions v "
                "   WHERE v.doc_id = d.doc_id AND v.version > 1) AS max_change "
                "FROM docs d JOIN accesses a ON a.doc_id = d.doc_id AND a.at > ? AND a.at <= ? "
                "WHERE d.status = 'active' GROUP BY d.id HAVING n >= ? AND max_change < ? "
                "ORDER BY n DESC, d.doc_id",
                (now - window_s, now, min_count, max_change),
            ).fetchall()
        return [
            HotDoc(doc_id, title, n * 3600.0 / window_s, versions, float(change))
            for doc_id, title, n, versions, change in rows
        ]

    def prune_accesses(self, older_than_s: float | None = None, now: float | None = None) -> int:
        """Delete access events older than ``older_than_s`` (default: the retention); returns how many."""
        now = self._clock() if now is None else now
        cutoff = now - (self._retention_s if older_than_s is None else older_than_s)
        with self._write("pruning accesses") as conn:
            return conn.execute("DELETE FROM accesses WHERE at < ?", (cutoff,)).rowcount


_DOC_COLUMNS = (
    "doc_id, title, text, tags, source, status, version, created_at, updated_at, "
    "(SELECT v.change_fraction FROM doc_versions v WHERE v.doc_id = docs.doc_id AND v.version = docs.version)"
)


def _doc(row: tuple) -> PlaintextDoc:
    doc_id, title, text, tags, source, status, version, created_at, updated_at, change = row
    return PlaintextDoc(
        doc_id=doc_id,
        title=title,
        text=text,
        tags=tuple(json.loads(tags)),
        source=source,
        status=status,
        version=version,
        change_fraction=float(change or 0.0),
        created_at=created_at,
        updated_at=updated_at,
    )


def _not_found(doc_id: str) -> NotFoundError:
    return NotFoundError(
        f"no plaintext memory document {doc_id!r}", hint="list documents with PlaintextMemory.list()"
    )


def _split_script(script: str) -> list[str]:
    """The statements of a schema script (``executescript`` would commit the open transaction first)."""
    statements, current = [], ""
    for line in script.splitlines():
        current += line.split("--", 1)[0] + "\n"
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    if current.strip():
        statements.append(current.strip() + ";")
    return statements
