"""Reading the history: what the command line, the console and the worker ask of SQL.

Every query here is served by an index (``models.py`` says which), returns plain JSON-ready
dicts, and is bounded: lists take a ``limit`` (at most ``MAX_LIMIT``) and a keyset cursor, so
a page costs the same on the first day and after a year. Run them inside ``db.reading`` so a
slow database gives up after a few seconds instead of hanging a terminal or a web worker.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from rilla_bridge.clock import Clock
from rilla_bridge.history.db import reading
from rilla_bridge.history.models import audit_log, calls, dead_letters, events, timeline
from rilla_bridge.history.records import seq
from rilla_bridge.history.search import e164
from rilla_bridge.providers import SOURCES
from rilla_bridge.transform.model import event_id_for

MAX_LIMIT = 500
MAX_TIMELINE = 1000
# A name search reads rows one by one (a substring has no index): without --since it looks at
# this many days back, which bounds it to a slice of the received_at index.
NAME_SEARCH_DAYS = 7
CALL_STATE_TIMEOUT_SECONDS = 2.0

LIST_COLUMNS = ("id", "tenant", "source", "kind", "call_id", "status", "reason", "received_at",
                "attempts", "last_status", "finished_at", "customer_phone", "customer_name",
                "rep_email")
_DL_LIST = ("id", "event_id", "tenant", "source", "kind", "call_id", "rilla_event_id",
            "reason_code", "reason", "status_code", "attempts", "first_failure_at", "failed_at",
            "handled_at", "handled_how", "handled_by")


@dataclass(frozen=True)
class EventFilter:
    """``events`` filters; all optional, combined with AND."""

    tenant: str | None = None
    source: str | None = None
    status: str | None = None
    kind: str | None = None
    since: float | None = None        # received_at >= since (epoch seconds)
    until: float | None = None        # received_at < until
    phone: str | None = None          # any format; compared in E.164
    name: str | None = None           # case-insensitive substring of the customer name
    rep_email: str | None = None
    call_id: str | None = None        # the provider's id, or our Rilla id "callrail-<id>"
    event_id: str | None = None       # our ev_... id


@dataclass(frozen=True)
class DeadLetterFilter:
    tenant: str | None = None
    source: str | None = None
    reason: str | None = None         # a reason code, or a fragment of the reason text
    open_only: bool = True
    # one group of ``dead_letter_groups``: tenant, reason code, Rilla status (None: no answer)
    group: tuple[str, str, int | None] | None = None

    def matches(self, row: dict[str, Any]) -> bool:
        """Whether one dead letter row passes the filter (as the query would decide)."""
        if self.open_only and row.get("handled_at") is not None:
            return False
        if (self.tenant and row.get("tenant") != self.tenant) or (
                self.source and row.get("source") != self.source):
            return False
        if self.group and (row.get("tenant"), row.get("reason_code"),
                           row.get("status_code")) != tuple(self.group):
            return False
        if self.reason:
            r = self.reason.strip().lower()
            return r == str(row.get("reason_code") or "").lower() or r in str(
                row.get("reason") or "").lower()
        return True


@dataclass(frozen=True)
class Page:
    """One page of rows and the cursor of the next one (None: this was the last)."""

    rows: list[dict[str, Any]]
    next: str | None


def _limit(limit: int) -> int:
    return max(1, min(int(limit), MAX_LIMIT))


def _cursor(t: float, ident: str) -> str:
    return f"{t!r}/{ident}"


def _parse_cursor(cursor: str) -> tuple[float, str]:
    t, _, ident = cursor.partition("/")
    try:
        return float(t), ident
    except ValueError:
        raise ValueError(f"bad cursor {cursor!r}") from None


def rilla_event_id(row: dict[str, Any]) -> str | None:
    """Our Rilla ``event_id`` (``callrail-<id>``) of an event that has a call id."""
    if row.get("call_id") and row.get("source"):
        return event_id_for(str(row["source"]), str(row["call_id"]))
    return None


def _event_row(row: Any, columns: Iterable[str]) -> dict[str, Any]:
    out = {c: row[c] for c in columns}
    out["event_id"] = rilla_event_id(out)
    return out


def _split_call_id(call_id: str) -> tuple[str | None, str]:
    for source in SOURCES:
        if call_id.startswith(f"{source}-"):
            return source, call_id[len(source) + 1:]
    return None, call_id


# -- events -----------------------------------------------------------------------------------
def events_page(conn: Connection, f: EventFilter, limit: int = 50, before: str | None = None,
                now: float | None = None) -> Page:
    """Events newest first (by received_at, then id), ``limit`` at most, older than the
    cursor ``before`` when given. A name search without ``since`` covers the last
    ``NAME_SEARCH_DAYS`` days before ``until`` (or ``now``)."""
    limit = _limit(limit)
    cols = [events.c[c] for c in LIST_COLUMNS]
    q = sa.select(*cols).where(events.c.received_at.is_not(None))
    if f.event_id:
        q = q.where(events.c.id == f.event_id)
    for name in ("tenant", "status", "kind"):
        if getattr(f, name):
            q = q.where(events.c[name] == getattr(f, name))
    source = f.source
    if f.call_id:
        from_id, call_id = _split_call_id(f.call_id.strip())
        source = source or from_id
        q = q.where(events.c.call_id == call_id)
    if source:
        q = q.where(events.c.source == source)
    if f.phone:
        q = q.where(events.c.customer_phone == (e164(f.phone) or f.phone.strip()))
    if f.rep_email:
        q = q.where(events.c.rep_email == f.rep_email.strip().lower())
    since = f.since
    if f.name:
        if since is None and now is not None:
            since = (f.until if f.until is not None else now) - NAME_SEARCH_DAYS * 86400
        pattern = "%" + _escape_like(f.name.strip()) + "%"
        q = q.where(events.c.customer_name.ilike(pattern, escape="\\"))
    if since is not None:
        q = q.where(events.c.received_at >= since)
    if f.until is not None:
        q = q.where(events.c.received_at < f.until)
    if before:
        t, ident = _parse_cursor(before)
        # the plain bound lets the index range do the work; the OR breaks ties by id
        q = q.where(events.c.received_at <= t,
                    sa.or_(events.c.received_at < t, events.c.id < ident))
    q = q.order_by(events.c.received_at.desc(), events.c.id.desc()).limit(limit + 1)
    rows = [_event_row(r, LIST_COLUMNS) for r in conn.execute(q).mappings()]
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(rows, _cursor(rows[-1]["received_at"], rows[-1]["id"]) if more else None)


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def event(conn: Connection, event_id: str, *, with_body: bool = False
          ) -> dict[str, Any] | None:
    """Everything about one event: ``event`` (its record; ``body`` only with ``with_body``),
    ``timeline`` (oldest first), ``dead_letters``, ``call`` (the call's merged state, see
    ``call_state``) and ``same_call`` (the call's other events, newest first)."""
    columns = [c.name for c in events.columns if with_body or c.name != "body"]
    row = conn.execute(sa.select(*(events.c[c] for c in columns))
                       .where(events.c.id == event_id)).mappings().first()
    if row is None:
        return None
    record = _event_row(row, columns)
    entries = list(conn.execute(
        sa.select(timeline.c.record, timeline.c.idx, timeline.c.t, timeline.c.what,
                  timeline.c.data).where(timeline.c.event_id == event_id)
        .order_by(timeline.c.t, timeline.c.record, timeline.c.idx).limit(MAX_TIMELINE))
                   .mappings())
    entries.sort(key=lambda e: (e["t"], seq(e["record"]), e["idx"]))
    letters = conn.execute(sa.select(*(dead_letters.c[c] for c in _DL_LIST))
                           .where(dead_letters.c.event_id == event_id)).mappings().all()
    out: dict[str, Any] = {
        "event": record,
        "timeline": [{"t": e["t"], "what": e["what"], **(e["data"] or {})} for e in entries],
        "dead_letters": sorted((dict(d) for d in letters), key=lambda d: seq(d["id"])),
        "call": None, "same_call": []}
    if record.get("call_id") and record.get("tenant") and record.get("source"):
        out["call"] = call_state(conn, record["tenant"], record["source"], record["call_id"])
        same = (sa.select(*(events.c[c] for c in LIST_COLUMNS))
                .where(events.c.call_id == record["call_id"],
                       events.c.tenant == record["tenant"],
                       events.c.source == record["source"], events.c.id != event_id)
                .order_by(events.c.received_at.desc()).limit(50))
        out["same_call"] = [_event_row(r, LIST_COLUMNS) for r in conn.execute(same).mappings()]
    return out


# -- dead letters -----------------------------------------------------------------------------
def _dead_letter_query(f: DeadLetterFilter) -> Any:
    q = sa.select(*(dead_letters.c[c] for c in _DL_LIST))
    if f.open_only:
        q = q.where(dead_letters.c.handled_at.is_(None))
    if f.tenant:
        q = q.where(dead_letters.c.tenant == f.tenant)
    if f.source:
        q = q.where(dead_letters.c.source == f.source)
    if f.group:
        tenant, code, status = f.group
        q = q.where(dead_letters.c.tenant == tenant, dead_letters.c.reason_code == code,
                    dead_letters.c.status_code.is_(None) if status is None
                    else dead_letters.c.status_code == status)
    if f.reason:
        r = f.reason.strip()
        q = q.where(sa.or_(sa.func.lower(dead_letters.c.reason_code) == r.lower(),
                           dead_letters.c.reason.ilike(f"%{_escape_like(r)}%", escape="\\")))
    return q


def dead_letters_page(conn: Connection, f: DeadLetterFilter, limit: int = MAX_LIMIT,
                      after: str | None = None) -> Page:
    """Dead letters oldest failure first (open ones only unless ``f.open_only`` is off)."""
    limit = _limit(limit)
    q = _dead_letter_query(f)
    if after:
        t, ident = _parse_cursor(after)
        q = q.where(dead_letters.c.failed_at >= t,
                    sa.or_(dead_letters.c.failed_at > t, dead_letters.c.id > ident))
    q = q.order_by(dead_letters.c.failed_at, dead_letters.c.id).limit(limit + 1)
    rows = [dict(r) for r in conn.execute(q).mappings()]
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(rows, _cursor(rows[-1]["failed_at"], rows[-1]["id"]) if more else None)


def dead_letters_count(conn: Connection, f: DeadLetterFilter, cap: int = 1_000_000
                       ) -> dict[str, int]:
    """How many dead letters match ``f`` per tenant (at most ``cap`` counted)."""
    inner = _dead_letter_query(f).limit(cap).subquery()
    q = sa.select(inner.c.tenant, sa.func.count()).group_by(inner.c.tenant)
    return {str(t): int(n) for t, n in conn.execute(q)}


def dead_letter(conn: Connection, ident: str) -> dict[str, Any] | None:
    """One dead letter, by its own id or by our event id (then the open one, else the
    newest), with the event's raw ``body`` (bytes, or None) and ``received_at``."""
    q = sa.select(dead_letters, events.c.body, events.c.received_at).select_from(
        dead_letters.outerjoin(events, events.c.id == dead_letters.c.event_id))
    if ident.startswith("ev_"):
        q = q.where(dead_letters.c.event_id == ident).order_by(
            dead_letters.c.handled_at.is_not(None), dead_letters.c.failed_at.desc()).limit(1)
    else:
        q = q.where(dead_letters.c.id == ident)
    row = conn.execute(q).mappings().first()
    return dict(row) if row is not None else None


def dead_letter_groups(conn: Connection, limit: int = 200) -> list[dict[str, Any]]:
    """Open dead letters counted by tenant x reason code x Rilla status, biggest first, each
    with its first and last failure and one sample (the newest).

    One statement: a group's newest letter is the one whose ``failed_at`` is the group's
    last, so the groups are joined back to their samples on that (within
    ``ix_dead_letters_open_group``). A query per group took the page four times as long, most
    of it planning and SQLAlchemy (``bench/console.py``)."""
    key = (dead_letters.c.tenant, dead_letters.c.reason_code, dead_letters.c.status_code)
    g = (sa.select(*key, sa.func.count().label("count"),
                   sa.func.min(dead_letters.c.failed_at).label("first_failed_at"),
                   sa.func.max(dead_letters.c.failed_at).label("last_failed_at"))
         .where(dead_letters.c.handled_at.is_(None)).group_by(*key)
         .order_by(sa.func.count().desc()).limit(_limit(limit)).subquery("g"))
    s = dead_letters.alias("s")
    newest = sa.and_(s.c.handled_at.is_(None), s.c.tenant == g.c.tenant,
                     s.c.reason_code == g.c.reason_code,
                     sa.or_(s.c.status_code == g.c.status_code,
                            sa.and_(s.c.status_code.is_(None), g.c.status_code.is_(None))),
                     s.c.failed_at == g.c.last_failed_at)
    q = (sa.select(g, s.c.id, s.c.event_id, s.c.reason, s.c.response_body)
         .select_from(g.outerjoin(s, newest))
         # of two letters failed in the same instant, the one with the greater id
         .order_by(g.c.count.desc(), g.c.tenant, g.c.reason_code, g.c.status_code,
                   s.c.id.desc()))
    groups: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in conn.execute(q).mappings():
        k = (r["tenant"], r["reason_code"], r["status_code"])
        if k in groups:
            continue
        groups[k] = {c: r[c] for c in ("tenant", "reason_code", "status_code", "count",
                                       "first_failed_at", "last_failed_at")}
        # (one statement, one snapshot: a group always finds its newest letter; None only
        # if that ever changed)
        groups[k]["sample"] = None if r["id"] is None else {
            c: r[c] for c in ("id", "event_id", "reason", "response_body")}
    return list(groups.values())


# -- calls and audit --------------------------------------------------------------------------
def call_state(db: Connection | Engine, tenant: str, source: str, call_id: str, *,
               timeout: float = CALL_STATE_TIMEOUT_SECONDS) -> dict[str, Any] | None:
    """A call's merged state as last written: ``{"state": {hash field: value}, "version": n,
    "updated_at": t}``, or None when history has none. Given an Engine, it opens its own
    read transaction that gives up after ``timeout`` seconds (the worker's reload path)."""
    if isinstance(db, Engine):
        with reading(db, timeout) as conn:
            return call_state(conn, tenant, source, call_id)
    row = db.execute(sa.select(calls.c.state, calls.c.version, calls.c.updated_at).where(
        calls.c.tenant == tenant, calls.c.source == source,
        calls.c.call_id == call_id)).first()
    if row is None:
        return None
    state = row.state if isinstance(row.state, dict) else json.loads(row.state)
    return {"state": state, "version": int(row.version), "updated_at": row.updated_at}


def audit(conn: Connection, limit: int = 50) -> list[dict[str, Any]]:
    """Operator actions, newest first."""
    q = sa.select(audit_log).order_by(audit_log.c.at.desc(), audit_log.c.id.desc())
    return [dict(r) for r in conn.execute(q.limit(_limit(limit))).mappings()]


class CallStateReader:
    """What a worker uses to reload a forgotten call's state (``workers/runtime.py``).

    The engine is made on first use. The worker's event loop waits while the database
    answers, so after a failure the reader refuses at once for ``backoff`` seconds instead of
    letting every late event wait out a timeout (the events retry later)."""

    def __init__(self, make: Callable[[], Engine], clock: Clock, backoff: float = 30.0) -> None:
        self._make = make
        self._engine: Engine | None = None
        self._clock = clock
        self._backoff = backoff
        self._down_until = 0.0

    def __call__(self, tenant: str, source: str, call_id: str) -> dict[str, str] | None:
        if self._clock.now() < self._down_until:
            raise ConnectionError("history database unavailable (recently failed)")
        try:
            if self._engine is None:
                self._engine = self._make()
            found = call_state(self._engine, tenant, source, call_id)
        except Exception:
            self._down_until = self._clock.now() + self._backoff
            raise
        if found is None:
            return None
        state = {str(k): str(v) for k, v in found["state"].items()}
        state["v"] = str(found["version"])
        return state
