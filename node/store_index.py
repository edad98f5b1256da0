"""The cube store's SQLite index: schema, migrations, connection settings and queries.

The index is the store's source of truth. A payload file without an index row is an orphan (left by a
writer killed between its rename and its commit) and is garbage; an index row is committed only after
its payload file is durable, so a row never points at a missing or partial file unless the disk lost
data or someone edited the store by hand (``verify_all`` finds that).

Settings, and why:

* ``journal_mode=WAL``: readers never block the writer nor each other, across processes.
* ``synchronous=FULL`` (default): in WAL mode a commit then fsyncs the WAL, so a ``put`` that returned
  survives a power cut, matching the payload fsync the put already paid for. A node tells the registry
  which digests it holds right after a put; a power cut that silently took the put back would make the
  catalog lie. ``NORMAL`` is as safe against a killed *process* (the WAL write is in the page cache
  before commit returns) and can never corrupt the index, but a power cut may roll back the last
  commits (their payloads become orphans for gc). FULL costs one WAL fsync per write transaction:
  ≈0.2 ms measured here when the WAL is overwritten in place (after its first checkpoint), up to one
  journal commit (2-4 ms on this disk) while it still grows. Callers that prefer throughput for many
  small writes may pass ``synchronous="NORMAL"``.
* ``busy_timeout``: writers from several processes queue on SQLite's lock instead of failing at once;
  write transactions start with ``BEGIN IMMEDIATE`` so they take the lock up front and never hit the
  deadlock-prone read-to-write upgrade.

Schema history: v1 cubes + lifecycle_events; v2 adds ``cubes.cold`` (where the payload lives: 0 =
objects/, 1 = cold/, compressed; see memfed.node.lifecycle). A store is upgraded in place when opened.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from memfed.errors import InvalidArgumentError, StorageError

SCHEMA_VERSION = 2
DEFAULT_BUSY_TIMEOUT_S = 30.0
SYNCHRONOUS_MODES = ("FULL", "NORMAL")

_SCHEMA_V1 = """
CREATE TABLE cubes (
    id          INTEGER PRIMARY KEY,
    cube_id     TEXT    NOT NULL,
    version     TEXT    NOT NULL,
    digest      TEXT    NOT NULL,          -- "sha256:<hex>", names the payload file
    kind        INTEGER NOT NULL,          -- memfed.mip.v1.CubeKind
    lifecycle   INTEGER NOT NULL,          -- memfed.mip.v1.LifecycleState, same as in the manifest
    priority    INTEGER NOT NULL,          -- memfed.mip.v1.Priority
    size        INTEGER NOT NULL,          -- payload bytes
    local_check BLOB    NOT NULL,          -- XXH3-128 of the payload, verified on every read (store_files)
    created_at  TEXT    NOT NULL,          -- the manifest's created_at, ISO 8601 UTC
    stored_at   TEXT    NOT NULL,          -- when this store accepted the cube, ISO 8601 UTC
    manifest    BLOB    NOT NULL,          -- deterministic CubeManifest bytes, lifecycle kept current
    UNIQUE (cube_id, version)
);
CREATE INDEX cubes_by_digest ON cubes (digest);
CREATE INDEX cubes_by_lifecycle ON cubes (lifecycle);

CREATE TABLE lifecycle_events (
    id          INTEGER PRIMARY KEY,
    cube_id     TEXT    NOT NULL,
    version     TEXT    NOT NULL,
    from_state  INTEGER NOT NULL,          -- 0 (UNSPECIFIED) for the event that records the put
    to_state    INTEGER NOT NULL,
    at          TEXT    NOT NULL,          -- ISO 8601 UTC
    reason      TEXT    NOT NULL,
    FOREIGN KEY (cube_id, version) REFERENCES cubes (cube_id, version) ON DELETE CASCADE
);
CREATE INDEX lifecycle_events_by_cube ON lifecycle_events (cube_id, version, id);
"""


# v2: archived payloads live compressed in cold/ instead of objects/. The index says which, so a crash
# between moving the file and committing the row is always resolved by the row (the other copy is an
# orphan for gc), never by looking at which files happen to exist.
_SCHEMA_V2 = """
ALTER TABLE cubes ADD COLUMN cold INTEGER NOT NULL DEFAULT 0  -- 1: payload in cold/<digest>.gz, not objects/
"""


def _run_script(conn: sqlite3.Connection, script: str) -> None:
    # executescript() would COMMIT the open transaction first; run statement by statement instead.
    for statement in script.split(";"):
        body = "\n".join(line.split("--", 1)[0] for line in statement.splitlines()).strip()
        if body:
            conn.execute(body)


def _migrate_0_to_1(conn: sqlite3.Connection) -> None:
    _run_script(conn, _SCHEMA_V1)


def _migrate_1_to_2(conn: sqlite3.Connection) -> None:
    _run_script(conn, _SCHEMA_V2)


# MIGRATIONS[n] upgrades a schema at version n-1 to version n, inside the one write transaction that
# also sets PRAGMA user_version, so a killed migration leaves the old version. When the schema changes:
# add a function here (never edit an old one) and bump SCHEMA_VERSION.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _migrate_0_to_1, 2: _migrate_1_to_2}


def now_iso() -> str:
    """Current time as ISO 8601 UTC with microseconds (sorts as text)."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class CubeRow:
    """One index row, as the store needs it."""

    cube_id: str
    version: str
    digest: str
    size: int
    local_check: bytes
    lifecycle: int
    manifest: bytes
    cold: int = 0  # 1: the payload is in cold storage (compressed), not in objects/


_ROW_COLUMNS = "cube_id, version, digest, size, local_check, lifecycle, manifest, cold"


def storage_error(exc: sqlite3.Error, path: Path, doing: str) -> StorageError:
    """Turn an sqlite3 error into a StorageError that says what was happening and what to do."""
    text = str(exc)
    lowered = text.lower()
    if "locked" in lowered or "busy" in lowered:
        return StorageError(
            f"cube store index {path} is busy: another process held its write lock too long while {doing}",
            hint="retry; if it persists, look for a hung memfed process holding the store",
        )
    if "full" in lowered:
        return StorageError(
            f"disk full while {doing} (cube store index {path}); nothing was changed",
            hint="free disk space and retry",
        )
    if "not a database" in lowered or "malformed" in lowered or "corrupt" in lowered:
        return StorageError(
            f"cube store index {path} is damaged ({text}) while {doing}",
            hint="restore the index from a backup; payload files in objects/ are intact and verifiable",
        )
    if "readonly" in lowered or "unable to open" in lowered:
        return StorageError(
            f"cannot write cube store index {path} ({text}) while {doing}",
            hint="check the store directory's permissions and that its filesystem is writable",
        )
    return StorageError(f"cube store index {path}: {text} while {doing}")


class StoreIndex:
    """One connection to the index of one store. Not thread-safe: the store serializes access."""

    def __init__(
        self, path: Path, *, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S, synchronous: str = "FULL"
    ) -> None:
        if synchronous not in SYNCHRONOUS_MODES:
            raise InvalidArgumentError(
                f"synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}, not {synchronous!r}"
            )
        self.path = path
        self._busy_timeout_s = busy_timeout_s
        self._synchronous = synchronous
        try:
            # isolation_level=None: autocommit; transactions are begun and ended explicitly below.
            self.conn = sqlite3.connect(
                str(path), timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise storage_error(exc, path, "opening the store") from exc
        try:
            self._configure()
            self._migrate()
        except sqlite3.Error as exc:
            self.conn.close()
            raise storage_error(exc, path, "opening the store") from exc
        except BaseException:
            self.conn.close()
            raise

    def _configure(self) -> None:
        # Switching a new database to WAL needs a moment of exclusive access; when several processes
        # create the same store at once, one may see SQLITE_BUSY here without the busy handler's help.
        deadline = time.monotonic() + self._busy_timeout_s
        while True:
            try:
                mode = self.conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc).lower() or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        if str(mode).lower() != "wal":
            raise StorageError(
                f"cube store index {self.path} cannot use WAL journaling (got {mode!r})",
                hint="keep the store on a local filesystem; network filesystems do not support WAL",
            )
        self.conn.execute(f"PRAGMA synchronous={self._synchronous}")
        self.conn.execute("PRAGMA foreign_keys=ON")

    def _migrate(self) -> None:
        current = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if current == SCHEMA_VERSION:
            return
        if current > SCHEMA_VERSION:
            raise StorageError(
                f"cube store index {self.path} has schema version {current}; this memfed reads up to "
                f"{SCHEMA_VERSION}",
                hint="upgrade memfed to open this store",
            )
        with self.write():
            # Re-read under the write lock: another process may have migrated meanwhile.
            current = self.conn.execute("PRAGMA user_version").fetchone()[0]
            for target in range(current + 1, SCHEMA_VERSION + 1):
                MIGRATIONS[target](self.conn)
                self.conn.execute(f"PRAGMA user_version={target}")

    # -- transactions ------------------------------------------------------------------------------

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction holding SQLite's write lock from the start (BEGIN IMMEDIATE)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self._rollback()
            raise
        try:
            self.conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def begin_write(self) -> None:
        """Start a write transaction by hand, for callers that must clean up files before rolling back."""
        self.conn.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self.conn.execute("COMMIT")

    def rollback(self) -> None:
        """Roll back the open transaction, if any; never raises."""
        self._rollback()

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: every query inside sees one snapshot."""
        self.conn.execute("BEGIN")
        try:
            yield self.conn
        finally:
            self._rollback()

    def _rollback(self) -> None:
        if self.conn.in_transaction:
            # The original error matters more; SQLite rolls back on close anyway.
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")

    def close(self) -> None:
        self.conn.close()

    # -- queries -----------------------------------------------------------------------------------

    def row(self, cube_id: str, version: str) -> CubeRow | None:
        r = self.conn.execute(
            f"SELECT {_ROW_COLUMNS} FROM cubes WHERE cube_id = ? AND version = ?", (cube_id, version)
        ).fetchone()
        return CubeRow(*r) if r else None

    def versions(self, cube_id: str) -> list[str]:
        return [v for (v,) in self.conn.execute("SELECT version FROM cubes WHERE cube_id = ?", (cube_id,))]

    def rows_by_digest(self, digest: str) -> list[CubeRow]:
        return [
            CubeRow(*r)
            for r in self.conn.execute(
                f"SELECT {_ROW_COLUMNS} FROM cubes WHERE digest = ? ORDER BY id", (digest,)
            )
        ]

    def digest_referenced(self, digest: str) -> bool:
        return (
            self.conn.execute("SELECT 1 FROM cubes WHERE digest = ? LIMIT 1", (digest,)).fetchone()
            is not None
        )

    def digest_referenced_at(self, digest: str, *, cold: bool) -> bool:
        """Whether a row whose payload is hot (``cold=False``) or cold references ``digest``."""
        return (
            self.conn.execute(
                "SELECT 1 FROM cubes WHERE digest = ? AND cold = ? LIMIT 1", (digest, int(cold))
            ).fetchone()
            is not None
        )

    def digests_at(self, *, cold: bool) -> set[str]:
        """Every digest whose payload some row expects in objects/ (``cold=False``) or in cold/."""
        return {
            d for (d,) in self.conn.execute("SELECT DISTINCT digest FROM cubes WHERE cold = ?", (int(cold),))
        }

    def version_states(self, cube_id: str) -> list[tuple[str, int, int]]:
        """(version, lifecycle, cold) of every stored version of a cube."""
        return list(
            self.conn.execute("SELECT version, lifecycle, cold FROM cubes WHERE cube_id = ?", (cube_id,))
        )

    def set_location(self, cube_id: str, version: str, *, cold: bool) -> None:
        self.conn.execute(
            "UPDATE cubes SET cold = ? WHERE cube_id = ? AND version = ?", (int(cold), cube_id, version)
        )

    def entered_state(self, state: int) -> list[tuple[str, str, str]]:
        """(cube_id, version, at) of every cube now in ``state``, ``at`` being when it last entered it."""
        return list(
            self.conn.execute(
                "SELECT c.cube_id, c.version, MAX(e.at) FROM cubes AS c JOIN lifecycle_events AS e"
                " ON e.cube_id = c.cube_id AND e.version = c.version AND e.to_state = c.lifecycle"
                " WHERE c.lifecycle = ? GROUP BY c.id ORDER BY c.cube_id, c.version",
                (state,),
            )
        )

    def all_digests(self) -> dict[str, int]:
        """digest -> payload size, for every payload the index references."""
        return dict(self.conn.execute("SELECT digest, MAX(size) FROM cubes GROUP BY digest"))

    def rows(self, cube_id_prefix: str | None, states: list[int] | None) -> list[CubeRow]:
        sql = f"SELECT {_ROW_COLUMNS} FROM cubes"
        where: list[str] = []
        args: list[object] = []
        if cube_id_prefix:
            # substr, not LIKE: '_' is legal in cube ids and a LIKE wildcard.
            where.append("substr(cube_id, 1, ?) = ?")
            args += [len(cube_id_prefix), cube_id_prefix]
        if states is not None:
            where.append(f"lifecycle IN ({', '.join('?' * len(states))})" if states else "0")
            args += states
        if where:
            sql += " WHERE " + " AND ".join(where)
        return [CubeRow(*r) for r in self.conn.execute(sql, args)]

    def insert(
        self,
        *,
        cube_id: str,
        version: str,
        digest: str,
        kind: int,
        lifecycle: int,
        priority: int,
        size: int,
        local_check: bytes,
        created_at: str,
        manifest: bytes,
        reason: str,
    ) -> None:
        stored_at = now_iso()
        self.conn.execute(
            "INSERT INTO cubes (cube_id, version, digest, kind, lifecycle, priority, size, local_check,"
            " created_at, stored_at, manifest) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                cube_id,
                version,
                digest,
                kind,
                lifecycle,
                priority,
                size,
                local_check,
                created_at,
                stored_at,
                manifest,
            ),
        )
        self.add_event(cube_id, version, 0, lifecycle, reason, at=stored_at)

    def add_event(
        self,
        cube_id: str,
        version: str,
        from_state: int,
        to_state: int,
        reason: str,
        *,
        at: str | None = None,
    ) -> None:
        self.conn.execute(
            "INSERT INTO lifecycle_events (cube_id, version, from_state, to_state, at, reason)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (cube_id, version, from_state, to_state, at or now_iso(), reason),
        )

    def update_lifecycle(self, cube_id: str, version: str, state: int, manifest: bytes) -> None:
        self.conn.execute(
            "UPDATE cubes SET lifecycle = ?, manifest = ? WHERE cube_id = ? AND version = ?",
            (state, manifest, cube_id, version),
        )

    def events(self, cube_id: str, version: str) -> list[tuple[int, int, str, str]]:
        return list(
            self.conn.execute(
                "SELECT from_state, to_state, at, reason FROM lifecycle_events"
                " WHERE cube_id = ? AND version = ? ORDER BY id",
                (cube_id, version),
            )
        )

    def delete(self, cube_id: str, version: str) -> None:
        # Events go explicitly too (not only by the cascade), so a connection without foreign_keys=ON
        # (an old tool, the sqlite3 shell) cannot leave history behind for a later cube of that name.
        self.conn.execute(
            "DELETE FROM lifecycle_events WHERE cube_id = ? AND version = ?", (cube_id, version)
        )
        self.conn.execute("DELETE FROM cubes WHERE cube_id = ? AND version = ?", (cube_id, version))

    def quick_check(self) -> list[str]:
        """SQLite's own consistency check of the index file; [] when healthy."""
        out = [r[0] for r in self.conn.execute("PRAGMA quick_check")]
        return [] if out == ["ok"] else out
