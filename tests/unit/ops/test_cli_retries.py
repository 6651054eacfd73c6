"""``rilla-bridge retries list|now`` (``ops/cli/retries.py``, through ``Operations``): events
made to wait by a worker runtime on fakeredis whose Rilla answers 503, a ``FakeClock``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner, Result

from ops.cli import common, main
from ops.cli import retries as retries_cli
from rilla_bridge import keys
from rilla_bridge.celery_messages import QUEUE_EVENTS, message_args
from rilla_bridge.clock import FakeClock
from rilla_bridge.history.records import Record
from rilla_bridge.lifecycle import Outcome
from tests.fakes import TENANTS, FakeRilla, load, make_runtime
from workers.pipeline import process_event
from workers.runtime import Runtime

OPERATOR = "cli:test-operator"


@pytest.fixture
def env(fake_redis: redis.Redis, clock: FakeClock, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(TENANTS)
    monkeypatch.setattr(common, "client", lambda settings: fake_redis)
    monkeypatch.setattr(retries_cli, "SystemClock", lambda: clock)
    return {"REDIS_URL": "redis://127.0.0.1:1/0", "TENANTS_FILE": str(tenants),
            "DATABASE_URL": f"sqlite:///{tmp_path / 'h.db'}", "RILLA_BRIDGE_OPERATOR": OPERATOR,
            "BULK_RATE_PER_SECOND": "2"}


def cli(env: dict[str, str], *args: str) -> Result:
    result = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def queued(client: redis.Redis) -> list[str]:
    raw: list[bytes] = client.lrange(QUEUE_EVENTS, 0, -1)  # type: ignore[assignment]
    return [str((message_args(m) or [""])[0]) for m in reversed(raw)]


def retrying(rt: Runtime, n: int, tenant: str = "acme") -> list[str]:
    """``n`` calls whose delivery Rilla answered 503: each waits in the tenant's retry set."""
    assert isinstance(rt.rilla, FakeRilla)
    out = []
    for i in range(n):
        body = dict(load("callrail", "post_call"), resource_id=f"CAL{tenant}{i:029d}")
        if tenant == "beta":
            body = dict(load("callingly", "call_completed"), id=1000 + i)
        rt.rilla.fail(503)
        stored = rt.lifecycle.receive(
            source="callrail" if tenant == "acme" else "callingly", tenant=tenant,
            kind="post_call" if tenant == "acme" else "call_completed",
            body=json.dumps(body).encode(), call_id=None)
        assert queued(rt.redis)[-1] == stored.event_id
        rt.redis.rpop(QUEUE_EVENTS)
        assert process_event(rt, stored.event_id, tenant) == Outcome.RETRY
        out.append(stored.event_id)
    return out


def test_list_shows_due_time_tenant_and_attempts(env: dict[str, str], fake_redis: redis.Redis,
                                                 clock: FakeClock) -> None:
    rt = make_runtime(fake_redis, clock)
    acme = retrying(rt, 2)
    beta = retrying(rt, 1, "beta")
    out = cli(env, "retries", "list").output
    for eid in [*acme, *beta]:
        (line,) = [x for x in out.splitlines() if x.startswith(eid)]
        assert "  1  " in line and ("acme" in line or "beta" in line)
        assert "in " in line   # not yet due
    assert "3 retries waiting" in out
    rows = json.loads(cli(env, "retries", "list", "--tenant", "beta", "--json").output)
    assert [(r["id"], r["tenant"], r["attempts"], r["lane"]) for r in rows] == [
        (beta[0], "beta", 1, "live")]
    assert rows[0]["due_at"] > clock.now()


def test_now_puts_them_back_paced_and_audited(env: dict[str, str], fake_redis: redis.Redis,
                                              clock: FakeClock) -> None:
    rt = make_runtime(fake_redis, clock)
    acme = retrying(rt, 4)
    beta = retrying(rt, 1, "beta")
    start = clock.now()
    out = cli(env, "retries", "now", "--tenant", "acme", "--yes").output
    assert "4 retries waiting for acme; putting them back at 2/s" in out
    assert "4 of 4 put back in their lanes" in out
    assert clock.now() - start == pytest.approx(1.5)    # 4 at 2/s: at 0, 0.5, 1, 1.5 s
    assert set(queued(fake_redis)) == set(acme)        # dispatched, in the queue at once
    assert fake_redis.zcard(keys.retry("acme")) == 0
    assert [r.decode() for r in fake_redis.zrange(keys.retry("beta"), 0, -1)  # type: ignore[union-attr]
            ] == beta
    raw: Any = fake_redis.xrange(keys.HISTORY)
    entries = [Record.from_entry(sid, f) for sid, f in raw]
    audit = [r for r in entries if r.type == "audit"]
    assert len(audit) == 1 and audit[0].data["action"] == "retries.now"
    assert audit[0].data["actor"] == OPERATOR and audit[0].data["count"] == 4
    assert "no retries waiting for acme" in cli(env, "retries", "now", "--tenant", "acme").output
