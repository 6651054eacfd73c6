"""The history writer (``rilla_bridge/history/writer.py``) on SQLite: one batch per
transaction, idempotent, and safe when batches arrive out of order."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from rilla_bridge import lifecycle
from rilla_bridge.clock import FakeClock
from rilla_bridge.history import db, writer
from rilla_bridge.history.models import audit_log, calls, dead_letters, events, timeline
from rilla_bridge.history.records import Record
from rilla_bridge.tenants import parse_tenants
from tests.fakes import TENANTS, HistoryRecords, load

TENANT_MAP = parse_tenants(TENANTS, env={})
TABLES = (events, timeline, calls, dead_letters, audit_log)


@pytest.fixture
def rec(clock: FakeClock) -> HistoryRecords:
    return HistoryRecords(clock)


def apply(engine: Engine, records: Sequence[Record]) -> writer.Applied:
    with db.writing(engine) as conn:
        return writer.apply(conn, records, TENANT_MAP)


def snapshot(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, in a stable order."""
    with db.reading(engine) as conn:
        return {t.name: sorted(tuple(r) for r in conn.execute(sa.select(t)))  # type: ignore[misc]
                for t in TABLES}


def event_row(engine: Engine, event_id: str) -> dict[str, Any]:
    with db.reading(engine) as conn:
        row = conn.execute(sa.select(events).where(events.c.id == event_id)).mappings().one()
    return dict(row)


def test_finished_statuses_are_lifecycles() -> None:
    assert {str(s) for s in lifecycle.TERMINAL} == writer.FINISHED


def test_received_stores_the_body_and_the_search_columns(history_db: Engine,
                                                         rec: HistoryRecords) -> None:
    body = {**load("callrail", "post_call"), "customer_phone_number": "(720) 555-0139"}
    r = rec.received("ev_1", body, call_id="CAL1")
    assert apply(history_db, [r]).events == 1
    row = event_row(history_db, "ev_1")
    assert row["body"] == r.body and row["size"] == len(r.body or b"")
    assert (row["tenant"], row["source"], row["kind"], row["call_id"], row["status"]) == (
        "acme", "callrail", "post_call", "CAL1", "queued")
    assert (row["customer_phone"], row["customer_name"], row["rep_email"]) == (
        "+17205550139", "Jordan Pike", "mike.r@acme.example")   # the tenant's users mapping
    assert row["finished_at"] is None and row["last_record"] == r.stream_id


def test_lead_events_keep_no_body(history_db: Engine, rec: HistoryRecords) -> None:
    r = rec.received("ev_lead", load("callingly", "lead_created"), source="callingly",
                     kind="lead_created", tenant="beta", status="skipped", kept=False)
    apply(history_db, [r])
    row = event_row(history_db, "ev_lead")
    assert row["body"] is None and row["status"] == "skipped"
    assert row["finished_at"] == row["received_at"]


def test_a_batch_applied_twice_writes_nothing_twice(history_db: Engine, rec: HistoryRecords,
                                                    clock: FakeClock) -> None:
    batch = [*rec.delivered_event("ev_1", call_id="CAL1"), rec.call("CAL1", 2)]
    clock.advance(1)
    batch += [rec.received("ev_2", call_id="CAL2"), rec.attempt("ev_2", 1, 422, "dead"),
              rec.dead("ev_2", call_id="CAL2"), rec.handled("ev_2", "deleted"), rec.audit()]
    first = apply(history_db, batch)
    after_first = snapshot(history_db)
    second = apply(history_db, batch)
    assert snapshot(history_db) == after_first
    assert second.events == 0
    assert first.calls == second.calls == [writer.CallWritten("acme", "callrail", "CAL1", 2)]
    counts = {name: len(rows) for name, rows in after_first.items()}
    assert counts == {"events": 2, "timeline": 3, "calls": 1, "dead_letters": 1,
                      "audit_log": 1}


def test_status_never_goes_back_when_batches_come_out_of_order(
        history_db: Engine, rec: HistoryRecords, clock: FakeClock) -> None:
    received = rec.received("ev_1", call_id="CAL1")
    clock.advance(1)
    retry = rec.attempt("ev_1", 1, 503, "retry_scheduled", next_attempt_at=clock.now() + 5,
                        last_payload={"event_id": "callrail-CAL1"})
    clock.advance(5)
    delivered = rec.attempt("ev_1", 2, 200, "delivered")
    apply(history_db, [delivered])        # the newest batch first: the row is made from it
    row = event_row(history_db, "ev_1")
    assert (row["status"], row["attempts"], row["tenant"]) == ("delivered", 2, None)
    apply(history_db, [received, retry])  # then the older ones
    row = event_row(history_db, "ev_1")
    assert row["status"] == "delivered" and row["attempts"] == 2 and row["last_status"] == 200
    assert row["finished_at"] == delivered.data["at"]
    assert row["last_record"] == delivered.stream_id
    # older records only filled what was missing: identity, body, the payload sent
    assert row["tenant"] == "acme" and row["body"] == received.body
    assert json.loads(row["last_payload"]) == {"event_id": "callrail-CAL1"}
    assert row["customer_phone"] == "+17205550139"
    with db.reading(history_db) as conn:
        whats = conn.execute(sa.select(timeline.c.what, timeline.c.data).where(
            timeline.c.event_id == "ev_1").order_by(timeline.c.t)).all()
    assert [(w, d["status"]) for w, d in whats] == [("attempt", 503), ("attempt", 200)]


def test_a_replay_makes_the_event_unfinished_again(history_db: Engine, rec: HistoryRecords,
                                                   clock: FakeClock) -> None:
    apply(history_db, [rec.received("ev_1", call_id="CAL1"),
                       rec.attempt("ev_1", 1, 422, "dead", reason="rejected")])
    assert event_row(history_db, "ev_1")["finished_at"] is not None
    clock.advance(60)
    apply(history_db, [rec.step("ev_1", "queued", tl=[{"what": "replayed"}])])
    row = event_row(history_db, "ev_1")
    assert row["status"] == "queued" and row["finished_at"] is None


@pytest.mark.parametrize("empty_set", [{}, []])       # cjson writes an empty table either way
def test_a_step_without_a_status_keeps_the_events_status(history_db: Engine,
                                                        rec: HistoryRecords, clock: FakeClock,
                                                        empty_set: Any) -> None:
    """A lapsed run's late settle and a recovered lease record their timeline with status
    null: the event's status (and when it finished) stay what they were."""
    apply(history_db, rec.delivered_event("ev_1", call_id="CAL1"))
    done = event_row(history_db, "ev_1")
    clock.advance(5)
    late = rec.step("ev_1", None, tl=[{"what": "attempt", "n": 1, "status": 422}])
    late.data["set"] = empty_set
    apply(history_db, [late])
    row = event_row(history_db, "ev_1")
    assert (row["status"], row["finished_at"]) == ("delivered", done["finished_at"])
    assert row["last_record"] == late.stream_id
    with db.reading(history_db) as conn:
        whats = conn.execute(sa.select(timeline.c.what).where(
            timeline.c.event_id == "ev_1")).scalars().all()
    assert whats == ["attempt", "attempt"]                # its timeline is kept


def test_a_status_less_step_applied_first_leaves_the_status_to_older_records(
        history_db: Engine, rec: HistoryRecords, clock: FakeClock) -> None:
    older = rec.received("ev_1", call_id="CAL1")
    clock.advance(1)
    newer = rec.step("ev_1", None, tl=[{"what": "requeued"}])
    apply(history_db, [newer])
    assert event_row(history_db, "ev_1")["status"] is None
    apply(history_db, [older])                             # an older batch, applied later
    row = event_row(history_db, "ev_1")
    assert (row["status"], row["last_record"]) == ("queued", newer.stream_id)


def test_dead_letters_open_until_handled(history_db: Engine, rec: HistoryRecords,
                                         clock: FakeClock) -> None:
    first = rec.dead("ev_1")
    clock.advance(10)
    handled = rec.handled("ev_1", "replayed", "cli:ops")
    clock.advance(10)
    again = rec.dead("ev_1")               # the replay failed again: a new, open dead letter
    # applied out of order: the later dead letter first, the first one last
    apply(history_db, [again])
    apply(history_db, [handled])
    apply(history_db, [first])
    with db.reading(history_db) as conn:
        rows = {r.id: r for r in conn.execute(sa.select(dead_letters))}
    assert rows[first.stream_id].handled_at == handled.data["at"]
    assert rows[first.stream_id].handled_how == "replayed"
    assert rows[first.stream_id].handled_by == "cli:ops"
    assert rows[again.stream_id].handled_at is None


def test_calls_only_move_to_newer_versions(history_db: Engine, rec: HistoryRecords) -> None:
    v3, v2 = rec.call("CAL1", 3, {"s:ev_b": "{}", "v": "3"}), rec.call("CAL1", 2, {"v": "2"})
    assert apply(history_db, [v3]).calls == [writer.CallWritten("acme", "callrail", "CAL1", 3)]
    assert apply(history_db, [v2]).calls == [writer.CallWritten("acme", "callrail", "CAL1", 2)]
    with db.reading(history_db) as conn:
        row = conn.execute(sa.select(calls)).one()
    assert row.version == 3 and row.state == {"s:ev_b": "{}", "v": "3"}
    # several versions of one call in a batch: the newest is written, once
    v5, v4 = rec.call("CAL1", 5, {"v": "5"}), rec.call("CAL1", 4, {"v": "4"})
    assert [c.version for c in apply(history_db, [v5, v4]).calls] == [5]


def test_records_not_understood_are_reported(history_db: Engine, rec: HistoryRecords) -> None:
    odd = [Record("1-0", "mystery", {"id": "ev_1"}), Record("1-1", "step", {}),
           Record("1-2", "call", {"tenant": "acme"})]
    applied = apply(history_db, odd)
    assert applied.ignored == ["1-0", "1-1", "1-2"] and applied.records == 3
    assert snapshot(history_db)["events"] == []


def test_values_from_redis_strings_are_typed(history_db: Engine, rec: HistoryRecords) -> None:
    r = rec.received("ev_1", call_id="CAL1")
    step = Record(rec.next_id(), "step", {"id": "ev_1", "at": "1767225601.5", "status": None,
                                          "set": {"attempts": "2", "last_status": "",
                                                  "next_attempt_at": "1767225700.25"}})
    apply(history_db, [r, step])
    row = event_row(history_db, "ev_1")
    assert (row["attempts"], row["last_status"], row["next_attempt_at"]) == (
        2, None, 1767225700.25)


def test_rows_changing_different_columns_in_one_batch_keep_the_rest(
        history_db: Engine, rec: HistoryRecords, clock: FakeClock) -> None:
    """An UPDATE sets only what changed, one statement per set of columns: two events that
    change different columns in one batch each get theirs, and nothing else moves."""
    apply(history_db, [rec.received("ev_1", call_id="CAL1"),
                       rec.received("ev_2", call_id="CAL2")])
    before = {e: event_row(history_db, e) for e in ("ev_1", "ev_2")}
    clock.advance(5)
    apply(history_db, [rec.attempt("ev_1", 1, 200, "delivered", last_payload={"ok": 1}),
                       rec.step("ev_2", None, reason="waiting for its recording")])
    one, two = event_row(history_db, "ev_1"), event_row(history_db, "ev_2")
    assert (one["status"], one["attempts"], one["last_status"]) == ("delivered", 1, 200)
    assert one["finished_at"] is not None and one["reason"] is None
    assert (two["status"], two["reason"]) == ("queued", "waiting for its recording")
    assert two["attempts"] == 0 and two["finished_at"] is None
    for e, row in (("ev_1", one), ("ev_2", two)):
        for column in ("tenant", "source", "kind", "call_id", "received_at", "customer_phone"):
            assert row[column] == before[e][column], (e, column)
