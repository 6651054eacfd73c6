"""Schema migrations of the history database (Alembic, run programmatically: no alembic.ini).

``rilla-bridge db upgrade`` (the Procfile's ``release`` line) calls ``upgrade``; running it
again at the current schema does nothing. A new migration goes in ``migrations/versions/``
next to ``0001_initial.py``, and ``models.py`` changes with it (a test compares the two).
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

from rilla_bridge.history.db import make_engine
from rilla_bridge.settings import Settings

MIGRATIONS = Path(__file__).with_name("migrations")


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def head() -> str:
    """The newest revision the code knows."""
    revision = ScriptDirectory.from_config(_config()).get_current_head()
    assert revision is not None
    return revision


def current(engine: Engine) -> str | None:
    """The revision the database is at (None: never migrated)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade_engine(engine: Engine, revision: str = "head") -> str | None:
    """Bring the database behind ``engine`` to ``revision`` in one transaction."""
    config = _config()
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, revision)
    return current(engine)


def upgrade(settings: Settings, revision: str = "head") -> str | None:
    """``db upgrade``: the database of ``DATABASE_URL`` at the newest schema; returns the
    revision it is at afterwards."""
    engine = make_engine(settings)
    try:
        return upgrade_engine(engine, revision)
    finally:
        engine.dispose()
