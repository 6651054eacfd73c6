"""The history process (``workers/history.py``) on fakeredis, SQLite and a FakeClock: it
drains the stream into SQL exactly once, waits out a database outage without losing or
doubling anything, picks up entries a stopped copy left, and sets bad records aside."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from rilla_bridge.clock import FakeClock
from rilla_bridge.history import db, retention
from rilla_bridge.history.models import calls, dead_letters, events, timeline
from rilla_bridge.history.writer import CallWritten
from rilla_bridge.settings import Settings
from rilla_bridge.tenants import parse_tenants
from tests.fakes import TENANTS, HistoryRecords, make_runtime, xadd_record
from workers import history
from workers.history import HISTORY, HISTORY_FAILED, HISTORY_GROUP, HistoryProcess

TENANT_MAP = parse_tenants(TENANTS, env={})


def make(client: redis.Redis, engine: Engine, clock: FakeClock, **kw: Any) -> HistoryProcess:
    kw.setdefault("consumer", "host-a")
    return HistoryProcess(Settings(history_batch=50), client, engine, TENANT_MAP, clock,
                          block_ms=None, **kw)


def counts(engine: Engine) -> dict[str, int]:
    with db.reading(engine) as conn:
        return {t.name: int(conn.execute(sa.select(sa.func.count()).select_from(t))
                            .scalar_one()) for t in (events, timeline, calls, dead_letters)}


def pending(client: redis.Redis) -> int:
    return int(client.xpending(HISTORY, HISTORY_GROUP)["pending"])


def feed(client: redis.Redis, clock: FakeClock, n: int = 3, prefix: str = "ev_") -> None:
    """``n`` delivered events of one call and the call's state: 2n + 1 stream entries."""
    rec = HistoryRecords(clock)
    for i in range(n):
        for r in rec.delivered_event(f"{prefix}{i}", call_id="CAL1"):
            xadd_record(client, r)
    xadd_record(client, rec.call("CAL1", n))


@pytest.fixture
def broken(tmp_path: Path) -> Engine:
    """An engine whose database cannot be opened (its directory does not exist)."""
    return db.make_engine(f"sqlite:///{tmp_path / 'missing' / 'h.db'}")


def test_drains_the_stream_into_sql_once(fake_redis: fakeredis.FakeRedis, history_db: Engine,
                                         clock: FakeClock) -> None:
    written: list[list[CallWritten]] = []
    process = make(fake_redis, history_db, clock, on_calls_written=written.append)
    feed(fake_redis, clock)
    assert process.step() == 7
    assert counts(history_db) == {"events": 3, "timeline": 3, "calls": 1, "dead_letters": 0}
    assert fake_redis.xlen(HISTORY) == 0 and pending(fake_redis) == 0   # acked and deleted
    assert written == [[CallWritten("acme", "callrail", "CAL1", 3)]]
    assert process.step() == 0 and written == [[CallWritten("acme", "callrail", "CAL1", 3)]]


def test_records_written_before_the_group_existed_are_read(
        fake_redis: fakeredis.FakeRedis, history_db: Engine, clock: FakeClock) -> None:
    feed(fake_redis, clock, 1)             # the stream exists, no history process yet
    assert make(fake_redis, history_db, clock).step() == 3


def test_a_database_outage_loses_nothing_and_writes_nothing_twice(
        fake_redis: fakeredis.FakeRedis, history_db: Engine, broken: Engine, clock: FakeClock,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "rilla_bridge.history")
    process = make(fake_redis, broken, clock)
    feed(fake_redis, clock)
    t0 = clock.now()
    for _ in range(8):
        assert process.step() == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        "history database unavailable: records wait in Redis"]       # once per outage
    # growing pauses, capped: 0.2 + 0.4 + 0.8 + 1.6 + 3.2 + 5 + 5 + 5
    assert clock.now() - t0 == pytest.approx(21.2)
    assert pending(fake_redis) == 7 and fake_redis.xlen(HISTORY) == 7
    feed(fake_redis, clock, 1, "ev_more")  # more arrives meanwhile
    process.engine = history_db            # the database is back
    assert process.step() == 7             # the same batch first
    assert process.step() == 3
    assert counts(history_db) == {"events": 4, "timeline": 4, "calls": 1, "dead_letters": 0}
    assert any(r.getMessage() == "history database reachable again" for r in caplog.records)
    assert fake_redis.xlen(HISTORY) == 0 and pending(fake_redis) == 0


def test_a_batch_written_but_not_acknowledged_is_acknowledged_later(
        fake_redis: fakeredis.FakeRedis, history_db: Engine, clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    process = make(fake_redis, history_db, clock)
    feed(fake_redis, clock)
    real_pipeline = fake_redis.pipeline
    failures = [redis.ConnectionError("lost")]

    def pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = real_pipeline(*args, **kwargs)
        if failures:
            def execute(*_: Any, **__: Any) -> Any:
                raise failures.pop()
            pipe.execute = execute  # type: ignore[method-assign]
        return pipe

    monkeypatch.setattr(fake_redis, "pipeline", pipeline)
    applied: list[int] = []
    real_apply = process._apply

    def counting_apply(records: Any) -> Any:
        applied.append(len(records))
        return real_apply(records)

    monkeypatch.setattr(process, "_apply", counting_apply)
    assert process.step() == 0             # written; the ack failed
    assert pending(fake_redis) == 7
    assert process.step() == 7             # acked now, not written again
    assert applied == [7]
    assert counts(history_db)["events"] == 3 and fake_redis.xlen(HISTORY) == 0


def test_entries_of_a_stopped_copy_are_picked_up(
        fake_redis: fakeredis.FakeRedis, history_db: Engine, broken: Engine,
        clock: FakeClock) -> None:
    feed(fake_redis, clock, 1)
    first = make(fake_redis, broken, clock, consumer="host-a")
    assert first.step() == 0               # read, not written: the copy "stops" here
    assert pending(fake_redis) == 3
    # the same host starts again: it reads its own pending entries first
    assert make(fake_redis, history_db, clock, consumer="host-a").step() == 3
    # a copy that died elsewhere: another one claims its idle entries
    feed(fake_redis, clock, 1, "ev_other")
    fake_redis.xreadgroup(HISTORY_GROUP, "host-gone", {HISTORY: ">"}, count=10)
    other = make(fake_redis, history_db, clock, consumer="host-b", claim_idle_ms=0)
    assert other.step() == 3
    assert counts(history_db)["events"] == 2 and pending(fake_redis) == 0


def test_bad_records_are_set_aside_and_the_rest_written(
        fake_redis: fakeredis.FakeRedis, history_db: Engine, clock: FakeClock) -> None:
    rec = HistoryRecords(clock)
    for r in rec.delivered_event("ev_1"):
        xadd_record(fake_redis, r)
    fake_redis.xadd(HISTORY, {"r": "step", "d": "{not json"})
    fake_redis.xadd(HISTORY, {"r": "gossip", "d": "{}"})
    # SQLite cannot store this integer: the writer fails on this record alone
    huge = rec.step("ev_1", None, attempts=10**30)
    xadd_record(fake_redis, huge)
    process = make(fake_redis, history_db, clock)
    assert process.step() == 5
    assert counts(history_db)["events"] == 1 and pending(fake_redis) == 0
    kept: Any = fake_redis.xrange(HISTORY_FAILED)
    assert [f[b"r"] for _, f in kept] == [b"step", b"gossip", b"step"]


def test_redis_errors_never_stop_it(history_db: Engine, clock: FakeClock,
                                    caplog: pytest.LogCaptureFixture) -> None:
    client = fakeredis.FakeRedis()
    process = make(client, history_db, clock)
    healthy = client.xreadgroup
    client.xreadgroup = lambda *a, **k: (_ for _ in ()).throw(redis.ConnectionError("down"))  # type: ignore[method-assign]
    for _ in range(3):
        assert process.step() == 0
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "Redis unavailable: history waits"]
    client.xreadgroup = healthy  # type: ignore[method-assign]
    feed(client, clock, 1)
    assert process.step() == 3


def test_retention_runs_in_one_copy_per_period(
        fake_redis: fakeredis.FakeRedis, history_db: Engine, clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[str] = []

    def prune(engine: Engine, **kw: Any) -> retention.Pruned:
        runs.append(str(kw["retention_days"]))
        return retention.Pruned()

    monkeypatch.setattr(retention, "prune", prune)
    a = make(fake_redis, history_db, clock, consumer="a", retention_every=600)
    b = make(fake_redis, history_db, clock, consumer="b", retention_every=600)
    a.step(), b.step()
    assert runs == []                      # not in the first seconds
    clock.advance(10)
    a.step(), b.step()
    assert runs == ["30"]
    clock.advance(300)
    a.step(), b.step()
    assert runs == ["30"]
    clock.advance(600)
    a.step(), b.step()
    assert len(runs) == 2


def test_run_forever_stops_on_sigterm(fake_redis: fakeredis.FakeRedis, history_db: Engine,
                                      clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    handlers: dict[int, Callable[..., None]] = {}
    monkeypatch.setattr(signal, "signal",
                        lambda signum, handler: handlers.__setitem__(signum, handler))
    process = make(fake_redis, history_db, clock)
    history.install_signals(process)
    assert set(handlers) == {signal.SIGTERM, signal.SIGINT}
    rounds = []
    real_step = process.step

    def step() -> int:
        rounds.append(1)
        if len(rounds) == 3:
            handlers[signal.SIGTERM](signal.SIGTERM, None)
        return real_step()

    monkeypatch.setattr(process, "step", step)
    process.run_forever()
    assert len(rounds) == 3


def test_after_a_small_batch_it_waits_so_the_next_carries_more(
        fake_redis: fakeredis.FakeRedis, history_db: Engine, clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    process = make(fake_redis, history_db, clock)   # batches of up to 50
    feed(fake_redis, clock, 3)                      # 7 entries: one small batch
    rounds: list[tuple[float, int, float]] = []     # (started, entries written, ended)
    real_step = process.step

    def step() -> int:
        started = clock.now()
        done = real_step()
        if not rounds:
            feed(fake_redis, clock, 30, prefix="big_")   # 61 entries arrive meanwhile
        rounds.append((started, done, clock.now()))
        if len(rounds) == 3:
            process.stop()
        return done

    monkeypatch.setattr(process, "step", step)
    process.run_forever()
    assert [n for _, n, _ in rounds] == [7, 50, 11]
    # After the small first batch, a wait of LINGER_SECONDS; after a full one, none.
    assert rounds[1][0] - rounds[0][2] == pytest.approx(history.LINGER_SECONDS)
    assert rounds[2][0] == pytest.approx(rounds[1][2])
    assert counts(history_db)["events"] == 33 and pending(fake_redis) == 0


def test_a_pause_ends_at_sigterm(fake_redis: fakeredis.FakeRedis, broken: Engine,
                                 clock: FakeClock) -> None:
    process = make(fake_redis, broken, clock)
    feed(fake_redis, clock, 1)
    process._backoff = history.BACKOFF_MAX
    process.stop()
    t0 = clock.now()
    assert process.step() == 0
    assert clock.now() == t0 and pending(fake_redis) == 3   # left pending for the next start


def test_lag_is_logged_and_idle_consumers_go(
        fake_redis: fakeredis.FakeRedis, history_db: Engine, clock: FakeClock,
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO, "rilla_bridge.history")
    process = make(fake_redis, history_db, clock)
    feed(fake_redis, clock, 1)
    process.step()
    lag = [r for r in caplog.records if r.getMessage() == "history lag"]
    assert len(lag) == 1 and lag[0].__dict__["backlog"] == 0
    fake_redis.xreadgroup(HISTORY_GROUP, "old-dyno", {HISTORY: ">"}, count=1)
    monkeypatch.setattr(history, "CONSUMER_IDLE_MS", -1)
    process._forget_idle_consumers()
    names = {c["name"] for c in fake_redis.xinfo_consumers(HISTORY, HISTORY_GROUP)}
    assert names == {b"host-a"}


def test_a_recovered_lease_keeps_the_events_status_in_sql(
        fake_redis: fakeredis.FakeRedis, history_db: Engine, clock: FakeClock) -> None:
    """The sweep puts an event whose worker died back in its lane with a status-less step
    (``lua/recover.lua``): history keeps the event's status and adds the timeline entry."""
    rt = make_runtime(fake_redis, clock)
    eid = rt.lifecycle.receive(source="callrail", tenant="acme", kind="post_call",
                               body=b'{"resource_id": "CAL1"}', call_id="CAL1").event_id
    run = rt.heartbeat.run_token()
    assert rt.lifecycle.claim(eid, "acme", run).event is not None   # then the worker dies
    clock.advance(rt.settings.delivery_lease_seconds)
    assert rt.lanes.sweep()[1] == 1
    assert make(fake_redis, history_db, clock).step() == 2
    with db.reading(history_db) as conn:
        status = conn.execute(sa.select(events.c.status).where(events.c.id == eid)).scalar_one()
        whats = conn.execute(sa.select(timeline.c.what).where(
            timeline.c.event_id == eid)).scalars().all()
    assert (status, whats) == ("queued", ["requeued"])
