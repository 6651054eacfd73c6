"""DATABASE_URL and the history settings (``rilla_bridge/settings.py``), engines
(``rilla_bridge/history/db.py``) and migrations (``rilla_bridge/history/migrate.py``) on
SQLite; the same on PostgreSQL is in ``tests/integration/test_history_db.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from rilla_bridge.history import db, migrate
from rilla_bridge.history.models import metadata
from rilla_bridge.settings import ConfigError, Settings, mask_url


@pytest.mark.parametrize(("raw", "url"), [
    ("", "sqlite:///rilla-bridge.db"),
    ("postgres://u:pw@db.example:5432/d1", "postgresql+psycopg://u:pw@db.example:5432/d1"),
    ("postgresql://u@localhost/d1", "postgresql+psycopg://u@localhost/d1"),
    ("postgresql+psycopg://u@localhost/d1", "postgresql+psycopg://u@localhost/d1"),
    ("sqlite:////var/lib/rb/history.db", "sqlite:////var/lib/rb/history.db"),
    ("  sqlite:///h.db  ", "sqlite:///h.db"),
])
def test_database_url_forms(raw: str, url: str) -> None:
    assert Settings.from_env({"DATABASE_URL": raw}).database_url == url


@pytest.mark.parametrize("raw", ["mysql://u:pw@h/d", "sqlite://relative.db", "h.db"])
def test_other_database_urls_are_refused_without_echoing_them(raw: str) -> None:
    with pytest.raises(ConfigError, match="DATABASE_URL must start with") as err:
        Settings.from_env({"DATABASE_URL": raw})
    assert "pw" not in str(err.value)


def test_the_password_is_never_shown() -> None:
    s = Settings.from_env({"DATABASE_URL": "postgres://rb:s3cr3t-pw@db.example:5432/h"})
    assert s.database_url_masked == "postgresql+psycopg://rb:***@db.example:5432/h"
    assert "s3cr3t" not in repr(s)
    assert mask_url("postgresql://h/d?password=s3cr3t&sslmode=require") == (
        "postgresql://h/d?password=***&sslmode=require")
    assert mask_url("sqlite:///rilla-bridge.db") == "sqlite:///rilla-bridge.db"
    engine = db.make_engine(s)       # lazy: nothing connects
    assert "s3cr3t" not in db.describe(engine) and "***" in db.describe(engine)


def test_history_settings() -> None:
    s = Settings.from_env({"HISTORY_RETENTION_DAYS": "7", "HISTORY_BATCH": "100"})
    assert (s.history_retention_days, s.history_batch) == (7, 100)
    assert (Settings().history_retention_days, Settings().history_batch) == (30, 500)
    with pytest.raises(ConfigError, match="HISTORY_RETENTION_DAYS"):
        Settings.from_env({"HISTORY_RETENTION_DAYS": "0"})


def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path: Path) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'h.db'}")
    with db.reading(engine) as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == db.BUSY_TIMEOUT_MS
    engine.dispose()


def test_a_write_transaction_rolls_back_on_error(tmp_path: Path) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'h.db'}")
    with db.writing(engine) as conn:
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
    with pytest.raises(RuntimeError), db.writing(engine) as conn:
        conn.exec_driver_sql("INSERT INTO t VALUES (1)")
        raise RuntimeError
    with db.reading(engine) as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM t").scalar() == 0
    engine.dispose()


def test_upgrade_from_empty_then_again(tmp_path: Path) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'h.db'}")
    assert migrate.upgrade(settings) == migrate.head() == "0003"
    assert migrate.upgrade(settings) == "0003"          # a second run changes nothing
    engine = db.make_engine(settings)
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
        tables = set(sa.inspect(conn).get_table_names())
    assert tables == {"alembic_version", "events", "timeline", "calls", "dead_letters",
                      "audit_log", "jobs"}
    engine.dispose()
