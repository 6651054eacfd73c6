"""Every Redis key rilla-bridge writes, named in one place.

Everything lives in the database of ``REDIS_URL``. Celery's kombu keys (``events``,
``callrail``, ``unacked*``, ``_kombu.*``) sit beside ours; ours all start with ``rb:``:

- ``rb:ev:{id}``           hash: one received event (raw body until retention ends, status)
- ``rb:ev:{id}:tl``        list: the event's timeline, JSON entries, same retention
- ``rb:dedup:{src}:{tenant}:{kind}:{sha256}``  our event id for a body seen recently
- ``rb:pending``           zset: events not finished yet, scored by when they were (re)queued
- ``rb:retry``             zset: events waiting for a retry, scored by when it is due
- ``rb:call:{tenant}:{src}:{call}``  hash: per-call merged state (snapshots, last delivery)
- ``rb:lock:call:{tenant}:{src}:{call}``  hash: who delivers that call right now, and until when
- ``rb:inflight:{tenant}`` zset: a tenant's deliveries in flight (cap per tenant)
- ``rb:capwait:{tenant}`` zset (+ ``:msg`` hash): events waiting for a slot under that cap
- ``rb:dlq:{id}`` / ``rb:dlq``   hash per dead letter / zset index by failure time
- ``rb:stats``             hash: counters the web /metrics endpoint exports
- ``rb:cr:*``              CallRail quota guard (layout in ``rilla_bridge.quota``)
- ``rb:run:{id}``          hash: progress of one reconciliation or backfill run
- ``rb:recon:{tenant}``    lease: the tenant's last reconciliation start
- ``rb:sched:{job}``       lease: which scheduler copy runs a periodic job this tick
"""

from __future__ import annotations

PENDING = "rb:pending"
RETRY = "rb:retry"
DLQ_INDEX = "rb:dlq"
STATS = "rb:stats"
QUOTA_PREFIX = "rb:cr"


def event(event_id: str) -> str:
    return f"rb:ev:{event_id}"


def timeline(event_id: str) -> str:
    return f"rb:ev:{event_id}:tl"


def dedup(source: str, tenant: str, kind: str, digest: str) -> str:
    return f"rb:dedup:{source}:{tenant}:{kind}:{digest}"


def call(tenant: str, source: str, call_id: str) -> str:
    return f"rb:call:{tenant}:{source}:{call_id}"


def call_lock(tenant: str, source: str, call_id: str) -> str:
    return f"rb:lock:call:{tenant}:{source}:{call_id}"


def inflight(tenant: str) -> str:
    return f"rb:inflight:{tenant}"


def cap_wait(tenant: str) -> str:
    return f"rb:capwait:{tenant}"


def cap_wait_messages(tenant: str) -> str:
    return f"rb:capwait:{tenant}:msg"


def dead_letter(event_id: str) -> str:
    return f"rb:dlq:{event_id}"


def run(run_id: str) -> str:
    return f"rb:run:{run_id}"


def reconcile(tenant: str) -> str:
    return f"rb:recon:{tenant}"


def scheduler_job(name: str) -> str:
    return f"rb:sched:{name}"
