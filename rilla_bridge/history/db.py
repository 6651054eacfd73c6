"""Connections to the history database: one engine per process, from ``DATABASE_URL``.

SQLite (the embedded default) runs in WAL mode, so the command line and the console read
while the history process writes; writers take the write lock at BEGIN (``BEGIN IMMEDIATE``)
rather than on their first write, so two writers wait for each other (``busy_timeout``)
instead of one failing half-way. PostgreSQL connections are checked before use (a restarted
server costs no failed batch), give up connecting after a few seconds, and every
transaction opened here carries a statement timeout, so a slow database shows up as an error
the caller can retry, not as a process that hangs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Engine

from rilla_bridge.settings import Settings, mask_url

CONNECT_TIMEOUT_SECONDS = 5
BUSY_TIMEOUT_MS = 10_000        # SQLite: how long a writer waits for another one
READ_TIMEOUT_SECONDS = 5.0      # the command line's and console's queries
WRITE_TIMEOUT_SECONDS = 15.0    # one history batch, or one retention batch

# Errors that say "the database is unreachable, or too slow right now", not "this data is bad":
# the history process backs off and tries the same batch again.
UNAVAILABLE: tuple[type[Exception], ...] = (sa.exc.OperationalError, sa.exc.InterfaceError,
                                            sa.exc.DisconnectionError, sa.exc.TimeoutError)


def make_engine(url: str | URL | Settings, **kwargs: Any) -> Engine:
    """An engine for ``url`` (or a Settings' ``database_url``) with the options above."""
    if isinstance(url, Settings):
        url = url.database_url
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = sa.create_engine(parsed, **kwargs)
        sa.event.listen(engine, "connect", _sqlite_connect)
        sa.event.listen(engine, "begin", _sqlite_begin)
        return engine
    connect_args = {"connect_timeout": CONNECT_TIMEOUT_SECONDS,
                    "application_name": "rilla-bridge",
                    # a server that vanished (no RST) is noticed in about a minute, not hours
                    "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
                    "keepalives_count": 3}
    connect_args.update(kwargs.pop("connect_args", {}))
    options: dict[str, Any] = {"pool_pre_ping": True}
    if "poolclass" not in kwargs:   # the command line connects once, without a pool
        options.update(pool_size=5, max_overflow=5, pool_timeout=CONNECT_TIMEOUT_SECONDS)
    options.update(kwargs)
    return sa.create_engine(parsed, connect_args=connect_args, **options)


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # pysqlite's own transaction handling starts transactions late and not for DDL; with
    # isolation_level None it leaves BEGIN to us (``_sqlite_begin``), the SQLAlchemy recipe.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")   # WAL: durable at checkpoints, never corrupt
    finally:
        cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    immediate = conn.get_execution_options().get("history_write", False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _statement_timeout(conn: Connection, seconds: float) -> None:
    if conn.dialect.name == "postgresql":
        # LOCAL: for this transaction only; the pooled connection keeps no setting.
        conn.exec_driver_sql(f"SET LOCAL statement_timeout = {max(1, int(seconds * 1000))}")


@contextmanager
def reading(engine: Engine, timeout: float = READ_TIMEOUT_SECONDS) -> Iterator[Connection]:
    """A connection in a read transaction whose statements give up after ``timeout``."""
    with engine.connect() as conn, conn.begin():
        _statement_timeout(conn, timeout)
        yield conn


@contextmanager
def writing(engine: Engine, timeout: float = WRITE_TIMEOUT_SECONDS) -> Iterator[Connection]:
    """A connection in a write transaction, committed when the block ends without error."""
    with engine.connect() as conn:
        conn.execution_options(history_write=True)
        with conn.begin():
            _statement_timeout(conn, timeout)
            yield conn


def describe(engine: Engine) -> str:
    """The engine's URL for messages, password masked."""
    return mask_url(engine.url.render_as_string(hide_password=False))
