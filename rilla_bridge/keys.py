"""Every Redis key rilla-bridge writes, named in one place.

Redis holds work in progress only; history goes to SQL through the ``rb:history`` stream.
Everything lives in the database of ``REDIS_URL``. Celery's kombu keys (``events``,
``callrail``, ``unacked*``, ``_kombu.*``) sit beside ours; ours all start with ``rb:``:

Per event, while it is not finished (deleted when it is):
- ``rb:ev:{id}``             hash: the raw body and what delivery needs (tenant, source, kind,
                             attempts, the claiming worker and its lease)
Per tenant ``{t}``:
- ``rb:lane:{t}``            list: event ids waiting for a slot, live webhooks (head first)
- ``rb:lane:{t}:bulk``       list: the same for replays and backfill, dispatched at a pace
- ``rb:inflight:{t}``        zset: event id -> lease end (ms) of a dispatched or running event
- ``rb:retry:{t}`` (``:bulk``)  zset: event id -> when its retry is due (s), per lane
- ``rb:open:{t}``            zset: event id -> when it was received (s); every unfinished event
Shared:
- ``rb:ready``               zset: tenants with waiting work and a free slot -> their turn
- ``rb:paused``              set: tenants whose delivery an operator paused
- ``rb:tenants``             set: tenants that ever had work (what the sweeps walk)
- ``rb:bulk``                hash: the token bucket that paces bulk work
- ``rb:history``             stream: history records for the SQL writer (``history.records``)
- ``rb:dd:{digest}``         our event id for a body seen within the dedup window
- ``rb:call:{t}:{src}:{c}``  hash: a call's merged state (snapshots, resolved recordings, last
                             delivery, version ``v``), until its history is written
- ``rb:lock:call:{t}:{src}:{c}``  hash: who delivers that call now, and until when
- ``rb:seen:{generation}``   bitmap: Bloom filter of calls whose state was handed to history
- ``rb:replayed:{id}``       a dead letter replayed recently (a second replay is refused)
- ``rb:stats``               hash: outcome counters for /metrics
- ``rb:last_webhook``        hash: ``tenant|source`` -> when its last webhook was taken (s)
- ``rb:limit:{t}``           hash: the tenant's intake token buckets (events, bytes)
- ``rb:readyz``              what /readyz writes to see that Redis takes writes
- ``rb:authfail:{address}``  failed signatures or tokens from one client address this minute
- ``rb:cr:*``                CallRail quota guard (layout in ``rilla_bridge.quota``), and
                             ``rb:cr:lookups:{t}:{hour}``: a tenant's recording lookups
- ``rb:run:{id}``            hash: progress of one reconciliation or backfill run
- ``rb:recon:{tenant}``      lease: the tenant's last reconciliation start
- ``rb:sched:{job}``         lease: which scheduler copy runs a periodic job this tick
- ``rb:signin:{address}``    failed console sign-ins from one client address (expires)
- ``rb:config:processes``    hash: process@host:pid -> the tenants configuration version it
                             runs, stamped (``rilla_bridge.tenant_config``)
- ``rb:console:overview``    the console's overview as the scheduler last computed it
                             (zlib-compressed JSON, expires; ``Operations.publish_overview``)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

READY = "rb:ready"
PAUSED = "rb:paused"
TENANTS = "rb:tenants"
BULK_BUCKET = "rb:bulk"
HISTORY = "rb:history"
HISTORY_GROUP = "history"
STATS = "rb:stats"
LAST_WEBHOOK = "rb:last_webhook"
READY_PROBE = "rb:readyz"
QUOTA_PREFIX = "rb:cr"
CONFIG_PROCESSES = "rb:config:processes"
OVERVIEW = "rb:console:overview"


def event(event_id: str) -> str:
    return f"rb:ev:{event_id}"


def lane(tenant: str) -> str:
    return f"rb:lane:{tenant}"


def bulk_lane(tenant: str) -> str:
    return f"rb:lane:{tenant}:bulk"


def inflight(tenant: str) -> str:
    return f"rb:inflight:{tenant}"


def retry(tenant: str) -> str:
    return f"rb:retry:{tenant}"


def bulk_retry(tenant: str) -> str:
    return f"rb:retry:{tenant}:bulk"


def open_events(tenant: str) -> str:
    return f"rb:open:{tenant}"


def auth_failures(address: str) -> str:
    return f"rb:authfail:{address}"


def intake_limit(tenant: str) -> str:
    return f"rb:limit:{tenant}"


def dedup(digest: str) -> str:
    return f"rb:dd:{digest}"


def call(tenant: str, source: str, call_id: str) -> str:
    return f"rb:call:{tenant}:{source}:{call_id}"


def call_lock(tenant: str, source: str, call_id: str) -> str:
    return f"rb:lock:call:{tenant}:{source}:{call_id}"


def seen(generation: int) -> str:
    return f"rb:seen:{generation}"


def replayed(event_id: str) -> str:
    return f"rb:replayed:{event_id}"


def lookups(tenant: str, hour: int) -> str:
    return f"rb:cr:lookups:{tenant}:{hour}"


def run(run_id: str) -> str:
    return f"rb:run:{run_id}"


def reconcile(tenant: str) -> str:
    return f"rb:recon:{tenant}"


def scheduler_job(name: str) -> str:
    return f"rb:sched:{name}"


def sign_in_failures(address: str) -> str:
    return f"rb:signin:{address}"


def last_webhook_field(tenant: str, source: str) -> str:
    """A tenant's source in ``rb:last_webhook`` (the intake script writes ``tenant|source``)."""
    return f"{tenant}|{source}"


def last_webhook_times(fields: Mapping[Any, Any]) -> dict[tuple[str, str], float]:
    """``rb:last_webhook`` as HGETALL returns it: ``(tenant, source) -> seconds``."""
    out: dict[tuple[str, str], float] = {}
    for raw, value in fields.items():
        field = raw.decode() if isinstance(raw, bytes) else str(raw)
        tenant, _, source = field.rpartition("|")
        out[(tenant, source)] = float(value)
    return out
