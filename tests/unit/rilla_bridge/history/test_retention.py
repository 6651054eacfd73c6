"""Retention (``rilla_bridge/history/retention.py``) on SQLite: finished history older than
the retention goes in small batches; open dead letters and their events stay."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from rilla_bridge.clock import FakeClock
from rilla_bridge.history import db, retention, writer
from rilla_bridge.history.models import calls, dead_letters, events, timeline
from rilla_bridge.history.records import Record
from rilla_bridge.tenants import parse_tenants
from tests.fakes import TENANTS, HistoryRecords

TENANT_MAP = parse_tenants(TENANTS, env={})
DAY = 86400


def apply(engine: Engine, records: Sequence[Record]) -> None:
    with db.writing(engine) as conn:
        writer.apply(conn, records, TENANT_MAP)


def count(engine: Engine, table: sa.Table) -> int:
    with db.reading(engine) as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


def ids(engine: Engine) -> set[str]:
    with db.reading(engine) as conn:
        return set(conn.execute(sa.select(events.c.id)).scalars())


def test_prune_deletes_old_finished_history_in_batches(history_db: Engine,
                                                       clock: FakeClock) -> None:
    rec = HistoryRecords(clock)
    old: list[Record] = []
    for i in range(7):
        old += rec.delivered_event(f"ev_old{i}", call_id=f"CAL{i}")
    old += [rec.call("CAL0", 1),
            rec.received("ev_dead", call_id="CALd"), rec.attempt("ev_dead", 1, 422, "dead"),
            rec.dead("ev_dead", call_id="CALd"),
            rec.received("ev_done", call_id="CALx"), rec.attempt("ev_done", 1, 422, "dead"),
            rec.dead("ev_done", call_id="CALx"), rec.handled("ev_done", "deleted"),
            rec.received("ev_stuck", call_id="CALs")]              # never finished
    apply(history_db, old)
    clock.advance(31 * DAY)
    apply(history_db, [*rec.delivered_event("ev_new", call_id="CALn"), rec.call("CALn", 1)])

    pruned = retention.prune(history_db, now=clock.now(), retention_days=30, batch=3)
    assert (pruned.events, pruned.dead_letters, pruned.calls, pruned.done) == (8, 1, 1, True)
    assert pruned.batches >= 4           # 8 events at 3 a batch, then the other passes
    # the open dead letter keeps its event and timeline; the unfinished one waits 2x retention
    assert ids(history_db) == {"ev_dead", "ev_stuck", "ev_new"}
    assert count(history_db, dead_letters) == 1
    with db.reading(history_db) as conn:
        left = set(conn.execute(sa.select(timeline.c.event_id)).scalars())
        assert left == {"ev_dead", "ev_new"}          # the cascade took the others' timelines
        assert set(conn.execute(sa.select(calls.c.call_id)).scalars()) == {"CALn"}

    clock.advance(31 * DAY)    # ev_new is old now, and ev_stuck past twice the retention
    retention.prune(history_db, now=clock.now(), retention_days=30)
    assert ids(history_db) == {"ev_dead"}             # open dead letters: kept until handled


def test_prune_stops_when_asked(history_db: Engine, clock: FakeClock) -> None:
    rec = HistoryRecords(clock)
    apply(history_db, [r for i in range(5) for r in rec.delivered_event(f"ev_{i}")])
    clock.advance(31 * DAY)
    part = retention.prune(history_db, now=clock.now(), retention_days=30, batch=2,
                           max_batches=1)
    assert (part.events, part.done) == (2, False)
    stopped = retention.prune(history_db, now=clock.now(), retention_days=30,
                              should_stop=lambda: True)
    assert (stopped.events, stopped.batches, stopped.done) == (0, 0, False)
    assert retention.prune(history_db, now=clock.now(), retention_days=30).events == 3
