"""The history process with a real Redis and a real database (SQLite and PostgreSQL): it waits
out a database it cannot reach and then writes everything exactly once, and the
``rilla-bridge history`` process stops cleanly on SIGTERM, mid-outage included."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from rilla_bridge.clock import FakeClock, SystemClock
from rilla_bridge.history import db
from rilla_bridge.history.migrate import upgrade_engine
from rilla_bridge.history.models import calls, dead_letters, events, timeline
from rilla_bridge.settings import Settings
from rilla_bridge.tenants import parse_tenants
from tests.fakes import TENANTS, HistoryRecords, xadd_record
from tests.support import free_port, wait_for
from workers.history import HISTORY, HISTORY_GROUP, HistoryProcess

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    e = db.make_engine(database_url)
    upgrade_engine(e)
    yield e
    e.dispose()


def unreachable(database_url: str, tmp_path: Path) -> str:
    """A URL of the same kind that nothing answers (a closed port; a missing directory)."""
    if database_url.startswith("sqlite"):
        return f"sqlite:///{tmp_path / 'not-there' / 'h.db'}"
    return f"postgresql+psycopg://postgres:pw@127.0.0.1:{free_port()}/nowhere"


def counts(engine: Engine) -> dict[str, int]:
    with db.reading(engine) as conn:
        return {t.name: int(conn.execute(sa.select(sa.func.count()).select_from(t))
                            .scalar_one()) for t in (events, timeline, calls, dead_letters)}


def feed(client: redis.Redis, prefix: str, n: int) -> None:
    rec = HistoryRecords(FakeClock(time.time()))
    for i in range(n):
        for r in rec.delivered_event(f"{prefix}{i}", call_id=f"CAL{prefix}{i}"):
            xadd_record(client, r)
        xadd_record(client, rec.call(f"CAL{prefix}{i}", 1))


def test_an_unreachable_database_then_the_right_one(
        real_redis: redis.Redis, engine: Engine, database_url: str, tmp_path: Path) -> None:
    broken = db.make_engine(unreachable(database_url, tmp_path))
    process = HistoryProcess(Settings(history_batch=40), real_redis, broken,
                             parse_tenants(TENANTS, env={}), SystemClock(), consumer="it",
                             block_ms=100)
    feed(real_redis, "ev_a", 30)                 # 90 entries
    for _ in range(3):
        assert process.step() == 0
    assert real_redis.xpending(HISTORY, HISTORY_GROUP)["pending"] == 40
    feed(real_redis, "ev_b", 10)                 # more arrives during the outage
    process.engine = engine
    written = 0
    while written < 120:
        done = process.step()
        assert done or written, "nothing written after the database came back"
        written += done
    assert counts(engine) == {"events": 40, "timeline": 40, "calls": 40, "dead_letters": 0}
    assert real_redis.xlen(HISTORY) == 0
    assert real_redis.xpending(HISTORY, HISTORY_GROUP)["pending"] == 0
    broken.dispose()


@pytest.fixture
def start() -> Iterator[Callable[[dict[str, str]], subprocess.Popen[bytes]]]:
    """Starts ``rilla-bridge history``; whatever a failed test left running is killed."""
    procs: list[subprocess.Popen[bytes]] = []

    def run(env: dict[str, str]) -> subprocess.Popen[bytes]:
        procs.append(subprocess.Popen([str(BIN / "rilla-bridge"), "history"], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        return procs[-1]

    yield run
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def stop(proc: subprocess.Popen[bytes]) -> tuple[float, int, str]:
    """SIGTERM; how long it took to exit, its code and its log."""
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return time.monotonic() - t0, proc.returncode, err.decode()


def test_the_process_stops_on_sigterm_and_resumes_its_entries(
        real_redis: redis.Redis, redis_url: str, engine: Engine, database_url: str,
        tmp_path: Path, start: Callable[[dict[str, str]], subprocess.Popen[bytes]]) -> None:
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(TENANTS)
    env = {**os.environ, "REDIS_URL": redis_url, "TENANTS_FILE": str(tenants),
           "DATABASE_URL": unreachable(database_url, tmp_path)}
    feed(real_redis, "ev_", 5)
    # down: it reads a batch, cannot write it, and stops at SIGTERM mid-pause
    proc = start(env)
    wait_for(lambda: real_redis.xpending(HISTORY, HISTORY_GROUP)["pending"] == 15,
             what="the batch read")
    seconds, code, log = stop(proc)
    assert code == 0 and seconds < 5, log
    assert "history database unavailable" in log and "history stopped" in log
    assert "pw@" not in log                        # the password is masked
    assert real_redis.xpending(HISTORY, HISTORY_GROUP)["pending"] == 15
    # up: the same host starts again and writes what it had read, then what is new
    proc = start({**env, "DATABASE_URL": database_url})
    feed(real_redis, "ev_new", 2)
    wait_for(lambda: counts(engine)["events"] == 7, what="the history written")
    wait_for(lambda: real_redis.xlen(HISTORY) == 0, what="the entries acknowledged")
    seconds, code, log = stop(proc)
    assert code == 0 and seconds < 5, log
    assert counts(engine) == {"events": 7, "timeline": 7, "calls": 7, "dead_letters": 0}
