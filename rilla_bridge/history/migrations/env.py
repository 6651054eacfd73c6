"""Alembic's environment for the history database: always run through ``migrate.py``, which
hands over an open connection (there is no alembic.ini)."""

from __future__ import annotations

from alembic import context

from rilla_bridge.history.models import metadata

# An arbitrary constant: concurrent ``db upgrade`` runs on PostgreSQL wait for each other.
_LOCK_ID = 72_671_623


def run_migrations_online() -> None:
    connection = context.config.attributes["connection"]
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_LOCK_ID})")
    context.configure(connection=connection, target_metadata=metadata,
                      # SQLite alters tables by copying them: later migrations need batch mode
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported: use db upgrade")
run_migrations_online()
