"""The rows one history batch writes, and how they are written (``writer.apply`` decides
what each record contributes; see its docstring for the idempotency and ordering rules)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from rilla_bridge.history.models import audit_log, calls, dead_letters, events, timeline
from rilla_bridge.history.records import Record, seq
from rilla_bridge.tenants import Tenant

HANDLED_WHAT = "dead_letter_handled"   # the timeline entry a ``handled`` record leaves
EVENT_COLUMNS = tuple(c.name for c in events.columns if c.name != "body")


class CallWritten(NamedTuple):
    """A call whose state SQL now holds at ``version`` or newer (its Redis copy may go)."""

    tenant: str
    source: str
    call_id: str
    version: int


@dataclass
class Applied:
    """What one ``apply`` did."""

    records: int = 0
    events: int = 0                  # event rows inserted or changed
    dead_letters: int = 0            # dead records in the batch (inserted, or there already)
    calls: list[CallWritten] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)   # stream ids of records not understood


class Batch:
    """The rows one ``apply`` writes: event rows (loaded, then changed in memory), timeline
    entries, dead letters, handled marks, call states and audit entries."""

    def __init__(self, conn: Connection, tenants: Mapping[str, Tenant]) -> None:
        self.conn = conn
        self.tenants = tenants
        self.applied = Applied()
        self.before: dict[str, dict[str, Any]] = {}
        self.rows: dict[str, dict[str, Any]] = {}
        self.has_body: set[str] = set()
        self.bodies: dict[str, bytes] = {}
        self.timeline: list[dict[str, Any]] = []
        self.dead: list[dict[str, Any]] = []
        self.handled: list[tuple[str, str, float, str | None, str | None]] = []
        self.calls: dict[tuple[str, str, str], tuple[int, Any, float]] = {}
        self.audit: list[dict[str, Any]] = []

    def load(self, ids: set[str]) -> None:
        if not ids:
            return
        query = (sa.select(*(events.c[n] for n in EVENT_COLUMNS),
                           events.c.body.is_not(None).label("has_body"))
                 .where(events.c.id.in_(sorted(ids))).with_for_update())
        for row in self.conn.execute(query).mappings():
            values = {n: row[n] for n in EVENT_COLUMNS}
            self.before[values["id"]] = values
            self.rows[values["id"]] = dict(values)
            if row["has_body"]:
                self.has_body.add(values["id"])

    def event(self, event_id: str) -> dict[str, Any]:
        """The event's row, made empty when the database has none yet."""
        row = self.rows.get(event_id)
        if row is None:
            row = {n: None for n in EVENT_COLUMNS} | {"id": event_id, "attempts": 0}
            self.rows[event_id] = row
        return row

    @staticmethod
    def newer(row: dict[str, Any], r: Record) -> bool:
        last = row.get("last_record")
        return last is None or seq(str(last)) < seq(r.stream_id)

    def set(self, row: dict[str, Any], column: str, value: Any, newer: bool) -> None:
        """A newer record's value replaces; an older one's only fills a gap."""
        if value is None and (not newer or column == "attempts"):
            return
        if column == "attempts" and not newer:
            row[column] = max(int(row[column] or 0), int(value))
        elif newer or row[column] is None:
            row[column] = value

    # -- writing ------------------------------------------------------------------------------
    def write(self) -> None:
        self._write_events()
        if self.timeline:
            self.conn.execute(_insert(self.conn, timeline).on_conflict_do_nothing(),
                              self.timeline)
        self._write_dead_letters()
        self._close_handled()
        self._write_calls()
        if self.audit:
            self.conn.execute(_insert(self.conn, audit_log).on_conflict_do_nothing(),
                              self.audit)

    def _write_events(self) -> None:
        new = [row for eid, row in self.rows.items() if eid not in self.before]
        changed = [row for eid, row in self.rows.items()
                   if eid in self.before and row != self.before[eid]]
        if new:
            self.conn.execute(events.insert(), [row | {"body": self.bodies.get(row["id"])}
                                                for row in new])
        # Only the columns that changed, one statement per set of them (a step changes the
        # same few, so a batch has one or two): the database sends and checks less per row.
        by_columns: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for row in changed:
            before = self.before[row["id"]]
            columns = tuple(n for n in EVENT_COLUMNS if n != "id" and row[n] != before[n])
            by_columns.setdefault(columns, []).append(
                {"_id": row["id"], **{n: row[n] for n in columns}})
        for columns, params in by_columns.items():
            stmt = (events.update().where(events.c.id == sa.bindparam("_id"))
                    .values({n: sa.bindparam(n) for n in columns}))
            self.conn.execute(stmt, params)
        fill = [{"_id": eid, "_body": body} for eid, body in self.bodies.items()
                if eid in self.before]
        if fill:
            self.conn.execute(events.update().where(events.c.id == sa.bindparam("_id"),
                                                    events.c.body.is_(None))
                              .values(body=sa.bindparam("_body")), fill)
        self.applied.events = len(new) + len(changed) + len(fill)

    def _write_dead_letters(self) -> None:
        if not self.dead:
            return
        self.applied.dead_letters = len(self.dead)
        # A ``handled`` record newer than a dead letter closed it, even if applied first.
        marks: dict[str, list[tuple[tuple[int, int], float, Any]]] = {}
        query = sa.select(timeline.c.event_id, timeline.c.record, timeline.c.t,
                          timeline.c.data).where(
            timeline.c.event_id.in_(sorted({d["event_id"] for d in self.dead})),
            timeline.c.what == HANDLED_WHAT)
        for event_id, record, t, data in self.conn.execute(query):
            marks.setdefault(event_id, []).append((seq(record), t, data))
        for d in self.dead:
            later = sorted(m for m in marks.get(d["event_id"], []) if m[0] > seq(d["id"]))
            if later:
                _, t, data = later[0]
                d.update(handled_at=t, handled_how=(data or {}).get("how"),
                         handled_by=(data or {}).get("by"))
        self.conn.execute(_insert(self.conn, dead_letters).on_conflict_do_nothing(), self.dead)

    def _close_handled(self) -> None:
        if not self.handled:
            return
        query = sa.select(dead_letters.c.id, dead_letters.c.event_id).where(
            dead_letters.c.event_id.in_(sorted({h[0] for h in self.handled})),
            dead_letters.c.handled_at.is_(None))
        open_by_event: dict[str, list[str]] = {}
        for dl_id, event_id in self.conn.execute(query):
            open_by_event.setdefault(event_id, []).append(dl_id)
        updates = []
        for event_id, stream_id, at, how, by in self.handled:
            for dl_id in open_by_event.get(event_id, []):
                if seq(dl_id) < seq(stream_id):   # only dead letters from before the handling
                    updates.append({"_id": dl_id, "_at": at, "_how": how, "_by": by})
            open_by_event[event_id] = [i for i in open_by_event.get(event_id, [])
                                       if seq(i) >= seq(stream_id)]
        if updates:
            self.conn.execute(
                dead_letters.update().where(dead_letters.c.id == sa.bindparam("_id"),
                                            dead_letters.c.handled_at.is_(None))
                .values(handled_at=sa.bindparam("_at"), handled_how=sa.bindparam("_how"),
                        handled_by=sa.bindparam("_by")), updates)

    def _write_calls(self) -> None:
        if not self.calls:
            return
        rows = [{"tenant": k[0], "source": k[1], "call_id": k[2], "version": v[0],
                 "state": v[1], "updated_at": v[2]} for k, v in self.calls.items()]
        stmt = _insert(self.conn, calls)
        stmt = stmt.on_conflict_do_update(
            index_elements=[calls.c.tenant, calls.c.source, calls.c.call_id],
            set_={"state": stmt.excluded.state, "version": stmt.excluded.version,
                  "updated_at": stmt.excluded.updated_at},
            where=calls.c.version < stmt.excluded.version)
        self.conn.execute(stmt, rows)
        self.applied.calls = [CallWritten(r["tenant"], r["source"], r["call_id"], r["version"])
                              for r in rows]


def _insert(conn: Connection, table: sa.Table) -> Any:
    """INSERT with the dialect's ON CONFLICT (the same on PostgreSQL and SQLite)."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)
