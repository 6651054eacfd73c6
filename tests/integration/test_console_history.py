"""The console's reads and bulk jobs on both history databases (SQLite and PostgreSQL): the
overview's counts and per-minute series (the bucket is computed in SQL, differently on each),
searches, dead-letter groups (one with no Rilla status), and the job table's hand-over from
planned to running, including a runner that died mid-job."""

from __future__ import annotations

import redis
import sqlalchemy as sa

from rilla_bridge.clock import FakeClock
from rilla_bridge.history.db import make_engine, reading, writing
from rilla_bridge.history.migrate import upgrade_engine
from rilla_bridge.history.models import jobs as jobs_table
from rilla_bridge.history.queries import DeadLetterFilter, EventFilter, dead_letters_count
from rilla_bridge.jobs import STALE_SECONDS, JobRunner
from rilla_bridge.operations import Operations
from rilla_bridge.settings import Settings
from tests.fakes import HistoryRecords
from tests.unit.app.console_support import seed, tenants, write


def test_console_reads_and_jobs(database_url: str, real_redis: redis.Redis) -> None:
    engine = make_engine(database_url)
    try:
        upgrade_engine(engine)
        clock = FakeClock()
        seed(engine, clock)
        h = HistoryRecords(clock)
        clock.advance(61)
        write(engine, [h.received("ev_t1", {"resource_id": "CALt1"}, call_id="CALt1"),
                       h.dead("ev_t1", reason_code="transform", reason="no recording",
                              status_code=None, call_id="CALt1")])
        ops = Operations(Settings(database_url=database_url), real_redis, engine, clock,
                         tenants())
        data = ops.overview()
        acme = next(t for t in data["tenants"] if t["tenant"] == "acme")
        assert acme["24h"]["received"] == 3 and acme["24h"]["dead"] == 1
        series = data["chart"]["series"]["acme"]
        assert sum(series["received"]) == 3 and sum(series["failed"]) == 1
        # 1-minute buckets over the day: the two seeded 61 s ago in the one before last
        assert len(series["received"]) == 1440 and series["received"][-3:] == [0, 2, 1]

        assert {r["id"] for r in ops.events(EventFilter(phone="720.555.0139")).rows} == {
            "ev_ok1", "ev_dead1"}
        assert [r["id"] for r in ops.events(EventFilter(name="LEE")).rows] == ["ev_dead2"]

        groups = {(g["tenant"], g["reason_code"], g["status_code"]): g
                  for g in ops.dead_letter_groups()}
        assert groups[("acme", "transform", None)]["sample"]["event_id"] == "ev_t1"
        assert groups[("acme", "rilla_rejected", 422)]["count"] == 1
        # each group's sample is its own (the groups are joined back to their newest letter)
        assert {k: g["sample"]["event_id"] for k, g in groups.items()} == {
            ("acme", "transform", None): "ev_t1", ("acme", "rilla_rejected", 422): "ev_dead1",
            ("beta", "rilla_error", 500): "ev_dead2"}
        with reading(engine) as conn:
            assert dead_letters_count(conn, DeadLetterFilter(group=("acme", "transform", None))
                                      ) == {"acme": 1}

        job = ops.plan("delete", {"filter": {"tenant": "acme"}}, "console:t")
        assert job["total"] == 2
        ops.confirm(job["id"], "console:t")
        runner = JobRunner(ops, engine, clock, name="a")
        taken = runner.claim()
        assert taken is not None and taken["status"] == "running" and taken["runner"] == "a"
        assert JobRunner(ops, engine, clock, name="b").claim() is None   # a holds it
        clock.advance(STALE_SECONDS + 1)                                 # a died
        second = JobRunner(ops, engine, clock, name="b")
        assert second.claim() is not None
        with writing(engine) as conn:   # hand it back as queued, and let b run it whole
            conn.execute(jobs_table.update().values(status="queued"))
        done = second.run_once()
        assert done is not None and (done["status"], done["done"]) == ("done", 2)
        with reading(engine) as conn:
            assert conn.execute(sa.select(jobs_table.c.runner)).scalar() == "b"
    finally:
        real_redis.delete("rb:history")
        engine.dispose()
