"""``rilla-bridge tenants purge`` (``ops/cli/purge.py`` through ``Operations.purge``): a
tenant's work in Redis and its history in SQL go, another tenant's stay. Events are made by a
worker runtime on fakeredis and written to a SQLite history by the history process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.engine import Engine

from ops.cli import common, main
from ops.cli import purge as purge_cli
from rilla_bridge import keys
from rilla_bridge.celery_messages import QUEUE_EVENTS, message_args
from rilla_bridge.clients.rilla import RillaResult
from rilla_bridge.clock import FakeClock
from rilla_bridge.history import db
from rilla_bridge.history.models import audit_log, calls, dead_letters, events, timeline
from rilla_bridge.history.records import Record
from rilla_bridge.lifecycle import Outcome
from rilla_bridge.settings import Settings
from rilla_bridge.tenants import parse_tenants
from tests.fakes import ACME_KEY, TENANTS, FakeRilla, load, make_runtime
from workers.history import HistoryProcess
from workers.pipeline import process_event
from workers.runtime import Runtime

BETA_ONLY = TENANTS[TENANTS.index("[tenants.beta]"):]


@pytest.fixture
def env(fake_redis: redis.Redis, history_db: Engine, clock: FakeClock, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    path = tmp_path / "tenants.toml"
    path.write_text(BETA_ONLY)      # acme offboarded: gone from the file
    monkeypatch.setattr(common, "client", lambda settings: fake_redis)
    monkeypatch.setattr(purge_cli, "SystemClock", lambda: clock)
    return {"REDIS_URL": "redis://127.0.0.1:1/0", "TENANTS_FILE": str(path),
            "DATABASE_URL": history_db.url.render_as_string(),
            "RILLA_BRIDGE_OPERATOR": "cli:offboarder"}


def _run(rt: Runtime, tenant: str, source: str, kind: str, body: dict[str, Any],
         answer: RillaResult | None = None, call_id: str | None = None) -> tuple[str, str]:
    """A webhook stored as intake stores it (``call_id``: what intake reads from the body; the
    history of an event stored without one names no call) and run by a worker."""
    assert isinstance(rt.rilla, FakeRilla)
    if answer is not None:
        rt.rilla.script = [answer]
    stored = rt.lifecycle.receive(source=source, tenant=tenant, kind=kind,
                                  body=json.dumps(body).encode(), call_id=call_id)
    raw = rt.redis.rpop(QUEUE_EVENTS)
    assert isinstance(raw, bytes) and (message_args(raw) or [""])[0] == stored.event_id
    return stored.event_id, process_event(rt, stored.event_id, tenant)


def _count(engine: Engine, table: Any, **where: Any) -> int:
    with db.reading(engine) as conn:
        q = sa.select(sa.func.count()).select_from(table).where(
            *(table.c[k] == v for k, v in where.items()))
        return int(conn.execute(q).scalar_one())


@pytest.fixture
def stored(fake_redis: redis.Redis, clock: FakeClock, history_db: Engine) -> dict[str, str]:
    """acme: one delivered call, one dead letter, one waiting for a retry (still in Redis);
    beta: one delivered call."""
    rt = make_runtime(fake_redis, clock)
    history = HistoryProcess(Settings(), fake_redis, history_db, parse_tenants(TENANTS, env={}),
                             clock, consumer="test", block_ms=None)
    post = load("callrail", "post_call")
    out = {}
    out["delivered"], o1 = _run(rt, "acme", "callrail", "post_call", post)
    out["dead"], o2 = _run(rt, "acme", "callrail", "post_call",
                           {**post, "resource_id": "CAL" + "7" * 32},
                           RillaResult("permanent", 422, "no such rep"))
    out["retry"], o3 = _run(rt, "acme", "callrail", "post_call",
                            {**post, "resource_id": "CAL" + "8" * 32},
                            RillaResult("retryable", 503, "down"), call_id="CAL" + "8" * 32)
    out["beta"], o4 = _run(rt, "beta", "callingly", "call_completed",
                           load("callingly", "call_completed"))
    assert (o1, o2, o3, o4) == (Outcome.DELIVERED, Outcome.DEAD, Outcome.RETRY,
                                Outcome.DELIVERED)
    while history.step():
        pass
    return out


def test_dry_run_counts_and_removes_nothing(env: dict[str, str], stored: dict[str, str],
                                           fake_redis: redis.Redis, history_db: Engine) -> None:
    before = sorted(fake_redis.keys("*"))
    result = CliRunner().invoke(main, ["tenants", "purge", "acme", "--dry-run"], env=env)
    assert result.exit_code == 0, result.output
    lines = {line.split(None, 1)[1]: int(line.split()[0])
             for line in result.output.splitlines()[1:-1]}
    assert lines["events in history (with raw bodies and payloads)"] == 3
    assert lines["dead letters in history (open or handled)"] == 1
    assert lines["events in progress in Redis (raw bodies)"] == 1        # the retry
    assert lines["dedup keys of recent bodies (Redis keys)"] == 3
    assert lines["timeline entries in history"] > 3 and lines["call states in history"] >= 2
    assert "dry run: nothing removed" in result.output
    assert sorted(fake_redis.keys("*")) == before
    assert _count(history_db, events, tenant="acme") == 3


def test_purge_asks_then_removes_only_that_tenant(env: dict[str, str], stored: dict[str, str],
                                                  fake_redis: redis.Redis,
                                                  history_db: Engine) -> None:
    no = CliRunner().invoke(main, ["tenants", "purge", "acme"], env=env, input="n\n")
    assert no.exit_code == 1 and "nothing removed" in no.output
    assert _count(history_db, events, tenant="acme") == 3
    result = CliRunner().invoke(main, ["tenants", "purge", "acme"], env=env, input="y\n")
    assert result.exit_code == 0, result.output
    assert "purged acme: 1 redis_events" in result.output and "3 sql_events" in result.output
    assert ACME_KEY not in result.output
    # Redis: nothing of acme's left (the keys a tenant's work uses, listed in keys.py).
    left = [k.decode() if isinstance(k, bytes) else k for k in fake_redis.keys("*")]
    assert [k for k in left if "acme" in k] == []
    assert fake_redis.exists(keys.event(stored["retry"])) == 0
    assert not fake_redis.sismember(keys.TENANTS, "acme")
    assert fake_redis.sismember(keys.TENANTS, "beta")
    assert fake_redis.hkeys(keys.LAST_WEBHOOK) == [b"beta|callingly"]   # acme's went too
    counters = [bytes(f).decode() for f in fake_redis.hkeys(keys.STATS)]  # type: ignore[arg-type]
    assert counters and all(f.endswith("|beta") for f in counters), counters
    # SQL: acme's events, timelines, dead letters and calls are gone; beta's stay.
    for table in (events, dead_letters, calls):
        assert _count(history_db, table, tenant="acme") == 0
        assert _count(history_db, table, tenant="beta") >= (0 if table is dead_letters else 1)
    assert _count(history_db, timeline, event_id=stored["delivered"]) == 0
    assert _count(history_db, timeline, event_id=stored["beta"]) > 0
    # The audit record is on its way to history.
    raw: Any = fake_redis.xrange(keys.HISTORY)
    audits = [r for r in (Record.from_entry(sid, f) for sid, f in raw) if r.type == "audit"]
    assert [(a.data["action"], a.data["actor"], a.data["selection"]) for a in audits] == [
        ("tenants.purge", "cli:offboarder", {"tenant": "acme"})]
    assert _count(history_db, audit_log) == 0   # (written by the history process later)


def test_a_tenant_still_configured_is_refused(env: dict[str, str], stored: dict[str, str],
                                             history_db: Engine) -> None:
    result = CliRunner().invoke(main, ["tenants", "purge", "beta", "--yes"], env=env)
    assert result.exit_code == 1
    assert "tenant 'beta' is still in" in result.output and "remove it there first" in (
        result.output)
    assert _count(history_db, events, tenant="beta") == 1
