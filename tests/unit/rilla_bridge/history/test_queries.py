"""The history's read side (``rilla_bridge/history/queries.py``) on SQLite: filters, search,
pagination, one event's whole story, dead letters and their groups, a call's state."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from rilla_bridge.clock import FakeClock
from rilla_bridge.history import db, queries, writer
from rilla_bridge.history.queries import DeadLetterFilter, EventFilter
from rilla_bridge.history.records import Record
from rilla_bridge.tenants import parse_tenants
from tests.fakes import TENANTS, HistoryRecords, load

TENANT_MAP = parse_tenants(TENANTS, env={})


def apply(engine: Engine, records: Sequence[Record]) -> None:
    with db.writing(engine) as conn:
        writer.apply(conn, records, TENANT_MAP)


def call_body(n: int, name: str, phone: str, agent: str = "") -> dict[str, Any]:
    return {**load("callrail", "post_call"), "resource_id": f"CAL{n}", "customer_name": name,
            "customer_phone_number": phone, "agent_email": agent}


@pytest.fixture
def seeded(history_db: Engine, clock: FakeClock) -> Engine:
    """Six events over six hours: three CallRail calls of acme (two events of CAL1), a
    Callingly call of beta, a dead one of acme; the clock ends an hour after the last."""
    rec = HistoryRecords(clock)
    batch: list[Record] = []
    batch += rec.delivered_event("ev_a1", call_body(1, "Jordan Pike", "+1 (720) 555-0139",
                                                    "mike@acme.example"), call_id="CAL1")
    clock.advance(3600)
    batch += rec.delivered_event("ev_a2", call_body(2, "Sam O'Neil", "303.555.0101"),
                                 call_id="CAL2")
    clock.advance(3600)
    batch += rec.delivered_event("ev_b1", load("callingly", "call_completed"), tenant="beta",
                                 source="callingly", kind="call_completed", call_id="41872219")
    clock.advance(3600)
    batch += [rec.received("ev_a3", call_body(3, "Jordan Pikeman", "7205550139"),
                           call_id="CAL3"),
              rec.attempt("ev_a3", 1, 422, "dead", reason="User email is not in Rilla"),
              rec.dead("ev_a3", call_id="CAL3")]
    clock.advance(3600)
    batch += [rec.received("ev_a4", call_body(1, "Jordan Pike", "+17205550139"),
                           kind="call_modified", call_id="CAL1"),
              rec.call("CAL1", 4, {"s:ev_a1": "{}", "s:ev_a4": "{}", "v": "4"})]
    clock.advance(3600)
    batch += [rec.received("ev_x", call_body(9, "Nobody", "+15125550199"), tenant="beta",
                           call_id="CAL9", status="skipped")]
    clock.advance(3600)
    apply(history_db, batch)
    return history_db


def ids(engine: Engine, f: EventFilter, clock: FakeClock, **kw: Any) -> list[str]:
    with db.reading(engine) as conn:
        return [r["id"] for r in queries.events_page(conn, f, now=clock.now(), **kw).rows]


@pytest.mark.parametrize(("f", "expected"), [
    (EventFilter(), ["ev_x", "ev_a4", "ev_a3", "ev_b1", "ev_a2", "ev_a1"]),
    (EventFilter(tenant="acme"), ["ev_a4", "ev_a3", "ev_a2", "ev_a1"]),
    (EventFilter(source="callingly"), ["ev_b1"]),
    (EventFilter(status="dead"), ["ev_a3"]),
    (EventFilter(tenant="acme", status="delivered"), ["ev_a2", "ev_a1"]),
    (EventFilter(kind="call_modified"), ["ev_a4"]),
    # the same number typed four ways
    (EventFilter(phone="(720) 555-0139"), ["ev_a4", "ev_a3", "ev_a1"]),
    (EventFilter(phone="+17205550139"), ["ev_a4", "ev_a3", "ev_a1"]),
    (EventFilter(phone="1-720-555-0139"), ["ev_a4", "ev_a3", "ev_a1"]),
    (EventFilter(phone="720.555.0139", tenant="acme", status="dead"), ["ev_a3"]),
    (EventFilter(name="jordan pike"), ["ev_a4", "ev_a3", "ev_a1"]),
    (EventFilter(name="PIKEMAN"), ["ev_a3"]),
    (EventFilter(name="o'neil"), ["ev_a2"]),
    (EventFilter(name="%"), []),                      # wildcards are literal
    (EventFilter(rep_email="MIKE.R@acme.example"), ["ev_a1"]),
    (EventFilter(call_id="CAL1"), ["ev_a4", "ev_a1"]),
    (EventFilter(call_id="callrail-CAL1"), ["ev_a4", "ev_a1"]),
    (EventFilter(call_id="callingly-CAL1"), []),
    (EventFilter(call_id="41872219"), ["ev_b1"]),
    (EventFilter(event_id="ev_a2"), ["ev_a2"]),
])
def test_events_filters(seeded: Engine, clock: FakeClock, f: EventFilter,
                        expected: list[str]) -> None:
    assert ids(seeded, f, clock) == expected


def test_time_range_and_the_default_range_of_a_name_search(seeded: Engine,
                                                           clock: FakeClock) -> None:
    start = clock.now() - 7 * 3600         # when ev_a1 was received
    assert ids(seeded, EventFilter(since=start + 3600, until=start + 3 * 3600), clock) == [
        "ev_b1", "ev_a2"]
    clock.advance(queries.NAME_SEARCH_DAYS * 86400)
    assert ids(seeded, EventFilter(name="jordan"), clock) == []     # older than the default
    assert ids(seeded, EventFilter(name="jordan", since=start), clock) == [
        "ev_a4", "ev_a3", "ev_a1"]


def test_pages_follow_the_cursor_without_gaps_or_repeats(seeded: Engine,
                                                         clock: FakeClock) -> None:
    seen: list[str] = []
    cursor: str | None = None
    with db.reading(seeded) as conn:
        while True:
            page = queries.events_page(conn, EventFilter(), limit=4, before=cursor)
            seen += [r["id"] for r in page.rows]
            if page.next is None:
                break
            cursor = page.next
    assert seen == ["ev_x", "ev_a4", "ev_a3", "ev_b1", "ev_a2", "ev_a1"]
    with db.reading(seeded) as conn:
        assert len(queries.events_page(conn, EventFilter(), limit=10_000).rows) == 6
        with pytest.raises(ValueError, match="bad cursor"):
            queries.events_page(conn, EventFilter(), before="yesterday/ev_1")


def test_list_rows_carry_the_rilla_event_id(seeded: Engine, clock: FakeClock) -> None:
    with db.reading(seeded) as conn:
        rows = {r["id"]: r for r in queries.events_page(conn, EventFilter()).rows}
    assert rows["ev_a1"]["event_id"] == "callrail-CAL1"
    assert rows["ev_b1"]["event_id"] == "callingly-41872219"
    assert {"id", "tenant", "source", "kind", "status", "event_id", "received_at"} <= set(
        rows["ev_a1"])


def test_one_event_with_its_timeline_call_and_dead_letters(seeded: Engine) -> None:
    with db.reading(seeded) as conn:
        a1 = queries.event(conn, "ev_a1")
        a3 = queries.event(conn, "ev_a3", with_body=True)
        assert queries.event(conn, "ev_nope") is None
    assert a1 is not None and a3 is not None
    assert "body" not in a1["event"] and a3["event"]["body"]
    assert [e["what"] for e in a1["timeline"]] == ["attempt"]
    assert a1["timeline"][0]["status"] == 200
    assert [e["id"] for e in a1["same_call"]] == ["ev_a4"]
    assert a1["call"]["version"] == 4 and "s:ev_a4" in a1["call"]["state"]
    assert [d["reason_code"] for d in a3["dead_letters"]] == ["rilla_rejected"]


def test_dead_letters(seeded: Engine, clock: FakeClock) -> None:
    rec = HistoryRecords(clock)
    apply(seeded, [rec.dead("ev_b1", tenant="beta", source="callingly", status_code=None,
                            reason_code="transform", reason="no usable start time")])
    clock.advance(1)
    apply(seeded, [rec.handled("ev_a3")])

    def letters(f: DeadLetterFilter) -> list[str]:
        with db.reading(seeded) as conn:
            return [r["event_id"] for r in queries.dead_letters_page(conn, f).rows]

    assert letters(DeadLetterFilter()) == ["ev_b1"]
    assert letters(DeadLetterFilter(open_only=False)) == ["ev_a3", "ev_b1"]
    assert letters(DeadLetterFilter(reason="start time")) == ["ev_b1"]
    assert letters(DeadLetterFilter(reason="TRANSFORM", tenant="beta")) == ["ev_b1"]
    assert letters(DeadLetterFilter(source="callrail")) == []
    with db.reading(seeded) as conn:
        by_event = queries.dead_letter(conn, "ev_a3")
        assert by_event is not None and by_event["handled_how"] == "replayed"
        assert by_event["body"] and by_event["received_at"]
        same = queries.dead_letter(conn, by_event["id"])
        assert same is not None and same["event_id"] == "ev_a3"
        assert queries.dead_letter(conn, "ev_nope") is None


def test_dead_letter_groups(history_db: Engine, clock: FakeClock) -> None:
    rec = HistoryRecords(clock)
    batch = []
    for i in range(3):
        batch.append(rec.dead(f"ev_r{i}", status_code=422))
        clock.advance(1)
    batch += [rec.dead("ev_t0", reason_code="transform", status_code=None)]
    clock.advance(1)
    batch += [rec.dead("ev_t1", reason_code="transform", status_code=None),
              rec.dead("ev_o1", tenant="beta", status_code=422),
              rec.dead("ev_o2", tenant="beta", status_code=409)]
    clock.advance(1)
    batch += [rec.dead("ev_r3", status_code=422)]   # the group's newest, then replayed
    apply(history_db, batch)
    clock.advance(1)
    apply(history_db, [rec.handled("ev_r3")])
    with db.reading(history_db) as conn:
        groups = queries.dead_letter_groups(conn)
    top = groups[0]
    assert (top["tenant"], top["reason_code"], top["status_code"], top["count"]) == (
        "acme", "rilla_rejected", 422, 3)
    assert top["first_failed_at"] < top["last_failed_at"]
    assert top["sample"]["event_id"] == "ev_r2"          # the newest open one
    # each group's own sample (the one query for all samples keeps them apart), a group
    # without a Rilla status included
    samples = {(g["tenant"], g["reason_code"], g["status_code"], g["count"]):
               g["sample"]["event_id"] for g in groups[1:]}
    assert samples == {("acme", "transform", None, 2): "ev_t1",
                       ("beta", "rilla_rejected", 422, 1): "ev_o1",
                       ("beta", "rilla_rejected", 409, 1): "ev_o2"}


def test_call_state_from_an_engine_or_a_connection(seeded: Engine) -> None:
    state = queries.call_state(seeded, "acme", "callrail", "CAL1")
    assert state is not None and state["version"] == 4
    assert state["state"] == {"s:ev_a1": "{}", "s:ev_a4": "{}", "v": "4"}
    with db.reading(seeded) as conn:
        assert queries.call_state(conn, "acme", "callrail", "CAL1") == state
        assert queries.call_state(conn, "beta", "callrail", "CAL1") is None


def test_audit_newest_first(history_db: Engine, clock: FakeClock) -> None:
    rec = HistoryRecords(clock)
    first = rec.audit("replay", 3)
    clock.advance(1)
    apply(history_db, [first, rec.audit("delete", 1)])
    with db.reading(history_db) as conn:
        rows = queries.audit(conn)
    assert [(r["action"], r["count"]) for r in rows] == [("delete", 1), ("replay", 3)]
    assert rows[1]["selection"] == {"all": True}
