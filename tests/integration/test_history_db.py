"""The history database on both SQLite and a real PostgreSQL server: migrations, the writer's
idempotency and ordering, the searches, retention, and (PostgreSQL) that every query the
command line and console run can be served by an index."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from click.testing import CliRunner
from sqlalchemy.engine import Engine

from ops.cli import main
from rilla_bridge.clock import FakeClock
from rilla_bridge.history import db, queries, retention, writer
from rilla_bridge.history.migrate import upgrade_engine
from rilla_bridge.history.models import metadata
from rilla_bridge.history.queries import DeadLetterFilter, EventFilter
from rilla_bridge.history.records import Record
from rilla_bridge.tenants import parse_tenants
from tests.fakes import TENANTS, HistoryRecords, load

pytestmark = pytest.mark.integration
TENANT_MAP = parse_tenants(TENANTS, env={})
DAY = 86400


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    e = db.make_engine(database_url)
    upgrade_engine(e)
    yield e
    e.dispose()


def apply(engine: Engine, records: Sequence[Record]) -> writer.Applied:
    with db.writing(engine) as conn:
        return writer.apply(conn, records, TENANT_MAP)


def dump(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    with db.reading(engine) as conn:
        return {t.name: sorted((tuple(json.dumps(v, sort_keys=True) if isinstance(v, dict)
                                      else v for v in row)
                                for row in conn.execute(sa.select(t))), key=repr)
                for t in metadata.sorted_tables}


def test_db_upgrade_from_empty_twice(database_url: str) -> None:
    # Heroku's form of a PostgreSQL URL, as DATABASE_URL arrives there
    env_url = database_url.replace("postgresql+psycopg://", "postgres://")
    for _ in range(2):
        result = CliRunner().invoke(main, ["db", "upgrade"], env={"DATABASE_URL": env_url})
        assert result.exit_code == 0, result.output
        assert "schema revision 0003, the newest" in result.output
    e = db.make_engine(database_url)
    with e.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
        inspector = sa.inspect(conn)
        indexes = {i["name"] for t in metadata.tables for i in inspector.get_indexes(t)}
    assert {"ix_events_tenant_status_received_at", "ix_events_customer_phone_received_at",
            "ix_events_call_id_tenant_source", "ix_dead_letters_open_group",
            "ix_timeline_event_id_t"} <= indexes
    e.dispose()


def lives(rec: HistoryRecords, clock: FakeClock) -> list[Record]:
    out = rec.delivered_event("ev_1", call_id="CAL1")
    clock.advance(1)
    out += [rec.received("ev_2", {**load("callrail", "post_call"), "resource_id": "CAL2"},
                         call_id="CAL2"),
            rec.attempt("ev_2", 1, 422, "dead", reason="rejected"), rec.dead("ev_2"),
            rec.call("CAL1", 2), rec.audit()]
    clock.advance(1)
    return [*out, rec.handled("ev_2", "deleted")]


def test_a_batch_applied_twice_writes_nothing_twice(engine: Engine, clock: FakeClock) -> None:
    batch = lives(HistoryRecords(clock), clock)
    apply(engine, batch)
    once = dump(engine)
    again = apply(engine, batch)
    assert dump(engine) == once and again.events == 0
    assert {k: len(v) for k, v in once.items()} == {
        "events": 2, "timeline": 3, "calls": 1, "dead_letters": 1, "audit_log": 1,
        "jobs": 0}


def test_out_of_order_batches_never_regress(engine: Engine, clock: FakeClock) -> None:
    batch = lives(HistoryRecords(clock), clock)
    for record in reversed(batch):          # every record in its own batch, newest first
        apply(engine, [record])
    reference = db.make_engine("sqlite://")
    upgrade_engine(reference)
    apply(reference, batch)                 # the same records, in order, in one batch
    assert dump(engine) == dump(reference)


def test_searches(engine: Engine, clock: FakeClock) -> None:
    rec = HistoryRecords(clock)
    batch: list[Record] = []
    for i, (name, phone) in enumerate([("Jordan Pike", "+17205550139"),
                                       ("Ana Ruiz", "(720) 555-0139"),
                                       ("JORDAN O'BRIEN", "303-555-0100")]):
        body = {**load("callrail", "post_call"), "resource_id": f"CAL{i}",
                "customer_name": name, "customer_phone_number": phone}
        batch += rec.delivered_event(f"ev_{i}", body, call_id=f"CAL{i}")
    apply(engine, batch)

    def found(**f: Any) -> list[str]:
        with db.reading(engine) as conn:
            page = queries.events_page(conn, EventFilter(**f), now=clock.now())
        return [r["id"] for r in page.rows]

    for typed in ("720-555-0139", "+1 720 555 0139", "(720)5550139", "17205550139"):
        assert found(phone=typed) == ["ev_1", "ev_0"]
    assert found(name="jordan") == ["ev_2", "ev_0"]
    assert found(name="o'brien") == ["ev_2"]
    assert found(name="_") == []
    assert found(call_id="CAL1") == ["ev_1"] == found(call_id="callrail-CAL1")
    assert found(tenant="acme", status="delivered", phone="3035550100") == ["ev_2"]


def test_retention_in_batches_keeps_open_dead_letters(engine: Engine, clock: FakeClock) -> None:
    rec = HistoryRecords(clock)
    batch: list[Record] = []
    for i in range(25):
        batch += rec.delivered_event(f"ev_{i:02}", call_id=f"CAL{i}")
    batch += [rec.received("ev_open", call_id="CALo"), rec.attempt("ev_open", 1, 422, "dead"),
              rec.dead("ev_open")]
    apply(engine, batch)
    clock.advance(31 * DAY)
    pruned = retention.prune(engine, now=clock.now(), retention_days=30, batch=10)
    assert (pruned.events, pruned.done) == (25, True) and pruned.batches >= 3
    with db.reading(engine) as conn:
        assert list(conn.execute(sa.text("SELECT id FROM events")).scalars()) == ["ev_open"]
        assert conn.execute(sa.text("SELECT count(*) FROM timeline")).scalar_one() == 1
        open_letters = queries.dead_letters_page(conn, DeadLetterFilter()).rows
    assert [d["event_id"] for d in open_letters] == ["ev_open"]


def test_call_state_for_the_worker(engine: Engine, clock: FakeClock) -> None:
    rec = HistoryRecords(clock)
    apply(engine, [rec.call("CAL1", 7, {"s:ev_1": '{"rank":2}', "delivered": "f00", "v": "7"})])
    state = queries.call_state(engine, "acme", "callrail", "CAL1", timeout=1.0)
    assert state is not None and state["version"] == 7
    assert state["state"]["delivered"] == "f00"
    assert queries.call_state(engine, "acme", "callrail", "CAL2") is None


# -- PostgreSQL: the plans ---------------------------------------------------------------------
def _plan(conn: sa.Connection, query: Any) -> str:
    compiled = query.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True})
    return "\n".join(conn.exec_driver_sql(f"EXPLAIN {compiled}").scalars())


def test_every_console_query_can_use_an_index(postgres_url: str) -> None:
    """On PostgreSQL, the production database (SQLite has the same indexes)."""
    from rilla_bridge.history.models import calls, dead_letters, events, timeline

    engine = db.make_engine(postgres_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    upgrade_engine(engine)

    ev = events.c
    cols = [ev.id, ev.received_at]
    newest = (ev.received_at.desc(),)
    dl = dead_letters.c
    checks = {
        "all": sa.select(*cols).order_by(*newest).limit(50),
        "tenant": sa.select(*cols).where(ev.tenant == "acme").order_by(*newest).limit(50),
        "status": sa.select(*cols).where(ev.status == "dead").order_by(*newest).limit(50),
        "tenant+status": sa.select(*cols).where(ev.tenant == "a", ev.status == "dead")
        .order_by(*newest).limit(50),
        "phone": sa.select(*cols).where(ev.customer_phone == "+1").order_by(*newest).limit(50),
        "rep": sa.select(*cols).where(ev.rep_email == "a@b").order_by(*newest).limit(50),
        "call id": sa.select(*cols).where(ev.call_id == "CAL1"),
        "same call": sa.select(*cols).where(ev.call_id == "C", ev.tenant == "a",
                                            ev.source == "callrail"),
        "retention": sa.select(ev.id).where(ev.finished_at < 5).limit(1000),
        "timeline": sa.select(timeline.c.what).where(timeline.c.event_id == "ev_1"),
        "open dead letters": sa.select(dl.id).where(dl.handled_at.is_(None))
        .order_by(dl.failed_at).limit(500),
        "open by tenant": sa.select(dl.id).where(dl.handled_at.is_(None), dl.tenant == "a"),
        "dead letters of an event": sa.select(dl.id).where(dl.event_id == "ev_1"),
        "call state": sa.select(calls.c.state).where(calls.c.tenant == "a",
                                                     calls.c.source == "s",
                                                     calls.c.call_id == "c"),
    }
    with engine.connect() as conn, conn.begin():
        conn.exec_driver_sql("SET LOCAL enable_seqscan = off")   # what is possible, not cheap
        for name, query in checks.items():
            plan = _plan(conn, query)
            assert "Seq Scan" not in plan, (name, plan)
    engine.dispose()
