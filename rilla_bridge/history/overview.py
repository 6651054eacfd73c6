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
# The overview's series count events per minute: 1,440 points a day per line, so the chart
# shows the minute a tenant stopped delivering. The database groups them (one row per tenant
# and minute with events, not one per event); the chart draws a flat run as its two ends.
BUCKET_MINUTES = 1

# How an event's status counts on the overview: retrying covers every "not yet, later" state.
RETRYING = ("retry_scheduled", "waiting", "waiting_recording")
COLUMNS = ("received", "delivered", "skipped", "retrying", "dead", "pending")


def _bucket(status: str | None) -> str:
    if status in ("delivered", "skipped", "dead"):
        return str(status)
    if status in RETRYING:
        return "retrying"
    return "pending"   # queued, in flight


def _bucket_expr(conn: Connection, since: float, seconds: int) -> Any:
    offset = (events.c.received_at - since) / seconds
    if conn.dialect.name == "postgresql":
        return sa.cast(sa.func.floor(offset), sa.Integer)
    return sa.cast(offset, sa.Integer)   # SQLite truncates: the same for positive values


def _sum_when(condition: Any) -> Any:
    return sa.func.sum(sa.case((condition, 1), else_=0))


def per_minute(conn: Connection, now: float, minutes: int = 1440
               ) -> dict[str, dict[str, list[int]]]:
    """``{tenant: {column: [n per bucket of BUCKET_MINUTES, oldest first]}}`` over the last
    ``minutes`` minutes (the last bucket ends at ``now``), by when each event was received
    and its status now; columns are ``COLUMNS`` plus ``failed`` (dead-lettered, for the
    chart). One grouped range scan of the ``(received_at, tenant, status)`` index, counted
    in the database: a row per tenant and bucket comes back, not one per event."""
    size = BUCKET_MINUTES * MINUTE
    buckets = minutes // BUCKET_MINUTES
    since = now - buckets * size
    bucket = _bucket_expr(conn, since, size).label("b")
    status = events.c.status
    q = (sa.select(events.c.tenant, bucket, sa.func.count().label("received"),
                   _sum_when(status == "delivered").label("delivered"),
                   _sum_when(status == "skipped").label("skipped"),
                   _sum_when(status == "dead").label("dead"),
                   _sum_when(status.in_(RETRYING)).label("retrying"))
         .where(events.c.received_at >= since, events.c.received_at <= now)
         .group_by(events.c.tenant, bucket))
    out: dict[str, dict[str, list[int]]] = {}
    # Up to a row per tenant and minute (28,800 for 20 busy tenants): plain tuples, no
    # per-row lookups by name.
    for tenant, b, received, delivered, skipped, dead, retrying in conn.execute(q):
        b = min(int(b), buckets - 1)   # received this very second: the last bucket
        if b < 0:
            continue
        name = str(tenant or "?")
        series = out.get(name)
        if series is None:   # not setdefault: its default would be built for every row
            series = out[name] = {c: [0] * buckets for c in (*COLUMNS, "failed")}
        received, delivered, skipped = int(received), int(delivered or 0), int(skipped or 0)
        dead, retrying = int(dead or 0), int(retrying or 0)
        series["received"][b] += received
        series["delivered"][b] += delivered
        series["skipped"][b] += skipped
        series["dead"][b] += dead
        series["failed"][b] += dead
        series["retrying"][b] += retrying
        series["pending"][b] += received - delivered - skipped - dead - retrying
    return out


def counts(series: dict[str, dict[str, list[int]]], last_minutes: int = 60
           ) -> dict[str, dict[str, dict[str, int]]]:
    """``{tenant: {"1h": {column: n}, "24h": {column: n}}}`` from ``per_minute``'s series."""
    last = last_minutes // BUCKET_MINUTES
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
