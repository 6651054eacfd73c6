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


def _empty() -> dict[str, int]:
    return dict.fromkeys(COLUMNS, 0)


def counts(conn: Connection, now: float) -> dict[str, dict[str, dict[str, int]]]:
    """``{tenant: {"1h": {column: n}, "24h": {column: n}}}`` for events received in the last
    hour and day (``received``: all of them; the others by their status now)."""
    hour_ago = now - HOUR
    recent = sa.case((events.c.received_at >= hour_ago, 1), else_=0)
    q = (sa.select(events.c.tenant, events.c.status, sa.func.count().label("n"),
                   sa.func.sum(recent).label("n1h"))
         .where(events.c.received_at >= now - DAY, events.c.received_at <= now)
         .group_by(events.c.tenant, events.c.status))
    out: dict[str, dict[str, dict[str, int]]] = {}
    for row in conn.execute(q):
        tenant = str(row.tenant or "?")
        per = out.setdefault(tenant, {"1h": _empty(), "24h": _empty()})
        col = _bucket(row.status)
        for window, n in (("24h", int(row.n)), ("1h", int(row.n1h or 0))):
            per[window]["received"] += n
            per[window][col] += n
    return out


def _minute(conn: Connection, since: float) -> Any:
    offset = (events.c.received_at - since) / MINUTE
    if conn.dialect.name == "postgresql":
        return sa.cast(sa.func.floor(offset), sa.Integer)
    return sa.cast(offset, sa.Integer)   # SQLite truncates: the same for positive values


def per_minute(conn: Connection, now: float, minutes: int = 1440
               ) -> dict[str, dict[str, list[int]]]:
    """``{tenant: {"received"|"delivered"|"failed": [n per minute, oldest first]}}`` over the
    last ``minutes`` minutes, by the minute each event was received (failed: dead-lettered)."""
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
            "received": [0] * minutes, "delivered": [0] * minutes, "failed": [0] * minutes})
        series["received"][m] += int(row.n)
        if row.status == "delivered":
            series["delivered"][m] += int(row.n)
        elif row.status == "dead":
            series["failed"][m] += int(row.n)
    return out


def last_received(conn: Connection, tenant: str, source: str | None = None) -> float | None:
    """When the tenant's newest event (of ``source``, when given) was received."""
    q = sa.select(events.c.received_at).where(events.c.tenant == tenant,
                                              events.c.received_at.is_not(None))
    if source:
        q = q.where(events.c.source == source)
    value = conn.execute(q.order_by(events.c.received_at.desc()).limit(1)).scalar()
    return float(value) if value is not None else None
