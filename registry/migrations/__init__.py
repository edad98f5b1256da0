"""Alembic migrations of the registry database, shipped inside the package and run on open.

``upgrade(engine)`` brings any database (new or old) to the newest revision. Developers add a revision
with ``alembic -c registry/migrations/alembic.ini revision -m "..."`` or by hand in ``versions/``.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine

HERE = Path(__file__).resolve().parent


def config(engine: Engine | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.set_main_option("path_separator", "os")
    if engine is not None:
        cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Run every pending migration on ``engine`` (idempotent)."""
    command.upgrade(config(engine), revision)
