from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import fakeredis
import pytest
import redis
import sentry_sdk
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from rilla_bridge.clock import FakeClock
from tests.support import RedisServer, shared_redis_url

if TYPE_CHECKING:
    from tests.fakes import CapturingTransport

# Where the PostgreSQL integration tests create their database (trust auth, as .ci/run sets
# up); TEST_POSTGRES_URL overrides. Tried in order; the first that answers is used.
POSTGRES_ADMIN_URLS = ("postgresql+psycopg://postgres@127.0.0.1:5432/test",
                       "postgresql+psycopg://root@127.0.0.1:5432/test",
                       "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a real Redis server (started for the session when none answers)."""
    url, server = shared_redis_url()
    yield url
    if server:
        server.stop()


@pytest.fixture
def real_redis(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def fake_redis() -> Iterator[fakeredis.FakeRedis]:
    client = fakeredis.FakeRedis()
    yield client
    client.close()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server process of the test's own, with append-only persistence."""
    server = RedisServer.temporary(appendonly=True)
    yield server
    server.stop()


@pytest.fixture
def clock() -> FakeClock:
    """The time of a unit test: it moves only when the test says ``clock.advance(s)``."""
    return FakeClock()


@pytest.fixture
def sentry_transport() -> Iterator[CapturingTransport]:
    """Sentry's events of the test (pass it to ``init_sentry``); Sentry is off again after."""
    from tests.fakes import CapturingTransport  # tests.fakes imports the workers: lazily

    transport = CapturingTransport()
    yield transport
    sentry_sdk.get_client().close()
    sentry_sdk.get_global_scope().set_client(None)
    sentry_sdk.get_global_scope().remove_tag("component")
    sentry_sdk.get_isolation_scope().clear()
    sentry_sdk.get_current_scope().clear()


# -- the history database ---------------------------------------------------------------------
@pytest.fixture(scope="session")
def history_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite history database, made once; ``history_db`` copies it per test."""
    from rilla_bridge.history.db import make_engine
    from rilla_bridge.history.migrate import upgrade_engine

    path = tmp_path_factory.mktemp("history") / "template.db"
    engine = make_engine(f"sqlite:///{path}")
    upgrade_engine(engine)
    engine.dispose()   # the last connection checkpoints the WAL into the file
    return path


@pytest.fixture
def history_db(history_template: Path, tmp_path: Path) -> Iterator[Engine]:
    """An engine on a fresh, migrated SQLite history database of the test's own."""
    from rilla_bridge.history.db import make_engine

    path = tmp_path / "history.db"
    shutil.copyfile(history_template, path)
    engine = make_engine(f"sqlite:///{path}")
    yield engine
    engine.dispose()


def _postgres_admin() -> Engine:
    urls = [os.environ["TEST_POSTGRES_URL"]] if os.environ.get("TEST_POSTGRES_URL") else list(
        POSTGRES_ADMIN_URLS)
    errors = []
    for url in urls:
        engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1),
                                  isolation_level="AUTOCOMMIT",
                                  connect_args={"connect_timeout": 5})
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
            return engine
        except sa.exc.SQLAlchemyError as exc:
            cause = getattr(exc, "orig", None) or exc
            errors.append(f"{engine.url.render_as_string()}: {type(cause).__name__}")
            engine.dispose()
    pytest.fail("no PostgreSQL for the history integration tests (.ci/run starts one on "
                "127.0.0.1:5432; or set TEST_POSTGRES_URL): " + "; ".join(errors),
                pytrace=False)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL database of this test session's own (``rb_test_<random>``), dropped at
    the end. Never skipped: a missing server fails the tests that need it."""
    admin = _postgres_admin()
    name = f"rb_test_{secrets.token_hex(4)}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    yield url
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty history database (no tables), once on SQLite (a file of the test's own) and
    once on PostgreSQL (the session's database, emptied for the test)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'history.db'}"
    url: str = request.getfixturevalue("postgres_url")
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    engine.dispose()
    return url
