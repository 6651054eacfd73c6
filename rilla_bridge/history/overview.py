"""What the console's overview reads from the history database: counts by tenant and status
over the last day, the same per minute for the charts, and each tenant's last webhook.

All three are range scans of the events' ``(received_at, tenant, status)`` index (the
"last day" slice only) or ``(tenant, received_at)`` newest-first lookups, grouped in the
database: the web process never loads rows one by one.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from rilla_bridge.history.models import events

DAY = 86400.0
HOUR = 3600.0
MINUTE = 60

# How an event's status counts on the overview: retrying covers every "not yet, later" state.
RETRYING = ("retry_scheduled", "waiting", "waiting_recording")
COLUMNS = ("received", "delivered", "skipped", "retrying", "dead", "pending")


def _bucket(status: str | None) -> str:
    if status in ("delivered", "skipped", "dead"):
        return str(status)
    if status in RETRYING:
        return "retrying"
    return "pending"   # queued, in flight


def _minute(conn: Connection, since: float) -> Any:
    offset = (events.c.received_at - since) / MINUTE
    if conn.dialect.name == "postgresql":
        return sa.cast(sa.func.floor(offset), sa.Integer)
    return sa.cast(offset, sa.Integer)   # SQLite truncates: the same for positive values


def per_minute(conn: Connection, now: float, minutes: int = 1440
               ) -> dict[str, dict[str, list[int]]]:
    """``{tenant: {column: [n per minute, oldest first]}}`` over the last ``minutes``
    minutes (the last bucket ends at ``now``), by the minute each event was received and
    its status now; columns are ``COLUMNS`` plus ``failed`` (dead-lettered, for the chart).
    One grouped range scan of the ``(received_at, tenant, status)`` index."""
    since = now - minutes * MINUTE
    minute = _minute(conn, since).label("m")
    q = (sa.select(events.c.tenant, minute, events.c.status, sa.func.count().label("n"))
         .where(events.c.received_at >= since, events.c.received_at <= now)
         .group_by(events.c.tenant, minute, events.c.status))
    out: dict[str, dict[str, list[int]]] = {}
    for row in conn.execute(q):
        m = min(int(row.m), minutes - 1)   # received this very second: the last minute
        if m < 0:
            continue
        series = out.setdefault(str(row.tenant or "?"), {
            c: [0] * minutes for c in (*COLUMNS, "failed")})
        n = int(row.n)
        series["received"][m] += n
        series[_bucket(row.status)][m] += n
        if row.status == "dead":
            series["failed"][m] += n
    return out


def counts(series: dict[str, dict[str, list[int]]], last: int = 60
           ) -> dict[str, dict[str, dict[str, int]]]:
    """``{tenant: {"1h": {column: n}, "24h": {column: n}}}`` from ``per_minute``'s series
    (``last``: the minutes of the short window)."""
    return {tenant: {"1h": {c: sum(s[c][-last:]) for c in COLUMNS},
                     "24h": {c: sum(s[c]) for c in COLUMNS}}
            for tenant, s in series.items()}


def last_received(conn: Connection, tenant: str, source: str | None = None) -> float | None:
    """When the tenant's newest event (of ``source``, when given) was received."""
    q = sa.select(events.c.received_at).where(events.c.tenant == tenant,
                                              events.c.received_at.is_not(None))
    if source:
        q = q.where(events.c.source == source)
    value = conn.execute(q.order_by(events.c.received_at.desc()).limit(1)).scalar()
    return float(value) if value is not None else None
