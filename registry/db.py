"""Registry storage: SQLAlchemy Core tables, SQLite (WAL) by default, PostgreSQL by URL.

Why Core and not the ORM: the registry's hot path is an authorization check that reads grants and
appends one audit entry; Core keeps that to a few statements with no identity-map work. The schema is
created and upgraded by Alembic (``memfed.registry.migrations``), run programmatically when a registry
opens its database, so a deployment never runs a separate migration step and the tables here are only
the shape queries use (the migration is the source of truth for the database).

Times are integer microseconds since the epoch: identical on both backends (no time-zone or float
surprises), and they enter the audit hash chain byte-exactly.
"""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Engine,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
)

from memfed.errors import InvalidArgumentError, StorageError

metadata = MetaData()

nodes = Table(
    "nodes",
    metadata,
    Column("node_id", String(128), primary_key=True),
    Column("cert_pem", LargeBinary, nullable=False),
    Column("cert_fingerprint", String(64), nullable=False),
    Column("key_id", String(64), nullable=False),
    Column("signing_key", LargeBinary, nullable=False),
    Column("kem_key", LargeBinary, nullable=False),
    Column("kem_suite", String(64), nullable=False),
    Column("fingerprint", String(64), nullable=False),
    Column("address", String(256), nullable=False),
    Column("registered_at", BigInteger, nullable=False),
)
principals = Table(
    "principals",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("kind", String(16), nullable=False),
)
group_members = Table(
    "group_members",
    metadata,
    Column("group_name", String(200), primary_key=True),
    Column("member", String(200), primary_key=True),
)
cube_versions = Table(
    "cube_versions",
    metadata,
    Column("cube_id", String(128), primary_key=True),
    Column("version", String(64), primary_key=True),
    Column("digest", String(80), nullable=False),
    Column("chain", Text, nullable=False),
    Column("signed_manifest", LargeBinary, nullable=False),
    Column("key_id", String(64), nullable=False),
    Column("publisher", String(128), nullable=False),
    Column("sequence", BigInteger, nullable=False),
    Column("published_at", BigInteger, nullable=False),
)
holders = Table(
    "holders",
    metadata,
    Column("cube_id", String(128), primary_key=True),
    Column("version", String(64), primary_key=True),
    Column("node_id", String(128), primary_key=True),
    Column("digest", String(80), nullable=False),
)
grants = Table(
    "grants",
    metadata,
    Column("cube_id", String(128), primary_key=True),
    Column("principal", String(200), primary_key=True),
    Column("action", String(16), primary_key=True),
    Column("expires_at", BigInteger, nullable=True),
    Column("granted_by", String(200), nullable=False),
    Column("created_at", BigInteger, nullable=False),
)
tokens = Table(
    "tokens",
    metadata,
    Column("token_id", String(64), primary_key=True),
    Column("principal", String(200), nullable=False),
    Column("cube_id", String(128), nullable=False),
    Column("action", String(16), nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Column("revoked", Boolean, nullable=False),
)
subscriptions = Table(
    "subscriptions",
    metadata,
    Column("node_id", String(128), primary_key=True),
    Column("cube_id", String(128), primary_key=True),
)
audit = Table(
    "audit",
    metadata,
    Column("sequence", BigInteger, primary_key=True, autoincrement=False),
    Column("at", BigInteger, nullable=False),
    Column("principal", String(200), nullable=False),
    Column("action", String(64), nullable=False),
    Column("cube_id", String(200), nullable=False),
    Column("allowed", Boolean, nullable=False),
    Column("reason", Text, nullable=False),
    Column("prev_hash", LargeBinary, nullable=False),
    Column("entry_hash", LargeBinary, nullable=False),
)
# One row per sequence the registry hands out ("audit", "catalog"): the row is locked (FOR UPDATE) while
# appending, which serializes writers across processes on PostgreSQL; SQLite serializes writers anyway.
counters = Table(
    "counters",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("value", BigInteger, nullable=False),
    Column("hash", LargeBinary, nullable=False),
)


def now_us() -> int:
    return time.time_ns() // 1000


def database_url(target: str | Path) -> str:
    """A SQLAlchemy URL from a URL or a path (a path means SQLite, the embedded default)."""
    text = str(target)
    if "://" in text:
        if text.startswith("postgresql://"):
            text = "postgresql+psycopg://" + text[len("postgresql://") :]
        if not text.startswith(("sqlite", "postgresql")):
            raise InvalidArgumentError(
                f"unsupported registry database URL {text.split('://')[0]}://...",
                hint="use a file path (SQLite) or postgresql+psycopg://user@host:port/db",
            )
        return text
    path = Path(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def open_engine(target: str | Path) -> Engine:
    """Connect and bring the schema to the newest migration. SQLite gets WAL and NORMAL sync (durable
    at every checkpoint, fast commits), and a busy timeout so two processes wait instead of failing."""
    url = database_url(target)
    try:
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

            @event.listens_for(engine, "connect")
            def _pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.execute("PRAGMA foreign_keys=ON")
                # Checkpoints run on the registry's own thread (WalCheckpointer), not inside whichever
                # decision happens to commit the 1000th page: that kept authorization p99 at fsync cost.
                cur.execute("PRAGMA wal_autocheckpoint=0")
                cur.close()
        else:
            engine = create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)
        from memfed.registry.migrations import upgrade

        upgrade(engine)
    except InvalidArgumentError:
        raise
    except Exception as exc:  # driver errors: unreachable server, bad credentials, unwritable file
        raise StorageError(
            f"cannot open the registry database {engine_label(url)}: {type(exc).__name__}: {exc}",
            hint="check the --db path or URL, and that the database server is running",
        ) from exc
    return engine


def engine_label(url: str) -> str:
    """The URL without a password, for messages."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':')[0]}@{host}"
    return url


class WalCheckpointer:
    """Checkpoint a SQLite WAL every ``interval_s`` on a daemon thread (PASSIVE: never blocks writers)."""

    def __init__(self, engine: Engine, interval_s: float = 1.0) -> None:
        import threading

        self.engine = engine
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memfed-registry-wal", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from sqlalchemy import text

        while not self._stop.wait(self.interval_s):
            try:
                with self.engine.connect() as conn:
                    conn.execute(text("PRAGMA wal_checkpoint(PASSIVE)"))
            except Exception:  # a busy or closing database: try again next round
                continue

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        from sqlalchemy import text

        try:
            with self.engine.connect() as conn:
                conn.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
        except Exception:
            pass
