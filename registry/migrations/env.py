"""Alembic environment: the engine comes from ``memfed.registry.migrations.upgrade`` (never a URL in a
file), so the same code migrates SQLite and PostgreSQL."""

from __future__ import annotations

from alembic import context

engine = context.config.attributes["engine"]
with engine.begin() as connection:
    context.configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()
