"""``rilla-bridge db``: the history database's schema."""

from __future__ import annotations

import click
from sqlalchemy.exc import SQLAlchemyError

from ops.cli import common, main


@main.group("db")
def db_group() -> None:
    """The history database (DATABASE_URL)."""


@db_group.command("upgrade")
def db_upgrade() -> None:
    """Bring the history database to the current schema (safe to run again; the Procfile's
    release step runs it before each deploy)."""
    from rilla_bridge.history.migrate import head, upgrade

    settings = common.settings()
    where = settings.database_url_masked
    try:
        revision = upgrade(settings)
    except SQLAlchemyError as exc:
        raise click.ClickException(
            f"cannot upgrade the history database {where}: {common.db_error(settings, exc)}"
        ) from None
    state = "the newest" if revision == head() else f"not the newest ({head()})"
    click.echo(f"history database {where}: schema revision {revision}, {state}")
