"""An event's life: every change of an event's status is made here, and only here.

    received ──▶ queued ──▶ (a worker) ──▶ delivered | skipped | dead      (finished)
                  ▲  │
                  │  ├──▶ waiting            the call is busy, or the tenant is at its cap
                  │  ├──▶ retry_scheduled    Rilla failed for now: backoff, then queued again
                  │  └──▶ waiting_recording  a CallRail recording lookup waits for quota
                  └──── replay of a dead letter, a due retry, a woken waiter, the lost-work sweep

Each step is one Lua script (``lua/``) or one MULTI pipeline, so several workers and several
schedulers can take the same step at once and an event is still queued exactly once. Every
step writes the event's status, its timeline and the counters /metrics exports together.
What a delivery decides (``workers/pipeline.py``) and when the scheduler runs a step
(``workers/scheduler.py``) live elsewhere; the steps themselves live here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis

from rilla_bridge import keys
from rilla_bridge.celery_messages import QUEUE_EVENTS, process_event_message
from rilla_bridge.clock import Clock, ms
from rilla_bridge.dlq import DeadLetters
from rilla_bridge.scripts import Scripts
from rilla_bridge.settings import Settings

log = logging.getLogger("rilla_bridge.lifecycle")

class Status(StrEnum):
    QUEUED = "queued"
    WAITING = "waiting"
    RETRY_SCHEDULED = "retry_scheduled"
    WAITING_RECORDING = "waiting_recording"
    DELIVERED = "delivered"
    SKIPPED = "skipped"
    DEAD = "dead"


# The finished statuses; requeue.lua lists the same three (a script cannot import them).
TERMINAL = frozenset({Status.DELIVERED, Status.SKIPPED, Status.DEAD})


class Outcome:
    """What one worker run did to an event; also the counters in ``rb:stats``."""

    DELIVERED = "delivered"
    UNCHANGED = "unchanged"
    SKIPPED = "skipped"
    RETRY = "retry_scheduled"
    DEAD = "dead_lettered"
    BUSY = "requeued_busy"
    WAITING = "waiting_recording"
    MISSING = "missing"
    DONE_ALREADY = "already_done"


def new_event_id(now: float) -> str:
    """Time-ordered, unguessable: ``ev_`` + milliseconds (hex) + 64 random bits."""
    return f"ev_{int(now * 1000):012x}{secrets.token_hex(8)}"


def timeline_entry(now: float, what: str, **data: Any) -> str:
    """One timeline entry as stored: JSON with the time ``t`` and ``what`` happened."""
    return json.dumps({"t": round(now, 3), "what": what, **data}, separators=(",", ":"))


def retry_delay(settings: Settings, attempts: int, retry_after: float | None) -> float:
    """Exponential backoff with equal jitter, capped; never earlier than Retry-After."""
    ceiling = min(settings.retry_max_delay_seconds,
                  # Exponent capped: 2**1024 overflows a float (tiny caps, long max age).
                  settings.retry_base_seconds * (2 ** min(max(0, attempts - 1), 60)))
    delay = ceiling / 2 + random.uniform(0, ceiling / 2)
    if retry_after:
        delay = max(delay, min(retry_after, settings.retry_max_delay_seconds))
    return float(delay)


@dataclass(frozen=True)
class Stored:
    event_id: str
    duplicate: bool


class Lifecycle:
    """The steps of an event's life, on one Redis client."""

    def __init__(self, client: redis.Redis, scripts: Scripts, clock: Clock,
                 settings: Settings, *,
                 intake_client: Callable[[], redis.Redis] | None = None) -> None:
        self.redis = client
        self.scripts = scripts
        self.clock = clock
        self.settings = settings
        self.dlq = DeadLetters(client, clock)
        # ``receive`` runs on this client when given (the web process: a connection per
        # thread, see redis_conn.ConnectionPerThread), else on ``client``.
        self._intake_client = intake_client
        self.dedup_window = max(1, settings.dedup_window_seconds)
        self.retention = max(60, settings.event_retention_seconds)

    # -- received ---------------------------------------------------------------------
    def receive(self, *, source: str, tenant: str, kind: str, body: bytes,
                call_id: str | None, keep_body: bool = True, enqueue: bool = True,
                status: Status = Status.QUEUED, note: str = "",
                extra: dict[str, str] | None = None) -> Stored:
        """Store one received body durably and queue it (one script); raises
        ``redis.RedisError`` when Redis can't take it. A body seen within the dedup window
        is not stored again: the answer names the first event."""
        now = self.clock.now()
        event_id = new_event_id(now)
        digest = hashlib.sha256(body).hexdigest()
        fields: list[Any] = []
        if note:
            fields += ["note", note]
        for k, v in (extra or {}).items():
            fields += [k, v]
        message = process_event_message(event_id, now) if enqueue else ""
        client = self._intake_client() if self._intake_client else None
        store_keys = [keys.dedup(source, tenant, kind, digest), keys.event(event_id),
                      keys.PENDING, QUEUE_EVENTS]
        args = [event_id, message, self.dedup_window, self.retention, repr(now), tenant,
                source, kind, str(status), len(body), digest, call_id or "",
                body if keep_body else "", *fields]
        try:
            code, stored_id = self.scripts.intake(keys=store_keys, args=args, client=client)
        except redis.ConnectionError:
            if client is None:
                raise
            # A single connection is not checked before use as a pooled one is, so after a
            # Redis restart the first command meets the closed socket (and redis-py 8 does
            # not retry it). It is disconnected now: one more try connects afresh. Had the
            # first try reached Redis, this one is answered as its duplicate, same id.
            code, stored_id = self.scripts.intake(keys=store_keys, args=args, client=client)
        sid = stored_id.decode() if isinstance(stored_id, bytes) else str(stored_id)
        return Stored(event_id=sid, duplicate=not code)

    # -- a worker starts -------------------------------------------------------------
    def start(self, event_id: str) -> dict[Any, Any]:
        """The event's record as a worker takes it (empty when gone). Its pending score is
        refreshed, so the lost-work sweep does not take a running event for a lost one."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(keys.PENDING, {event_id: self.clock.now()}, xx=True)
            pipe.hgetall(keys.event(event_id))
            raw: dict[Any, Any] = pipe.execute()[1]
        return raw

    def forget(self, event_id: str) -> None:
        """Drop a finished or vanished event from the pending index (a stray copy ran)."""
        self.redis.zrem(keys.PENDING, event_id)

    # -- finished ---------------------------------------------------------------------
    def entry(self, what: str, **data: Any) -> str:
        return timeline_entry(self.clock.now(), what, **data)

    def finish(self, event_id: str, status: Status, outcome: str, entry: str,
               extra: dict[str, Any] | None = None, pipe: Any = None, *,
               tenant: str = "") -> None:
        """Set the status (dropping a finished event from the pending index), append the
        timeline entry and count the outcome; on ``pipe`` when given (the caller executes).
        With ``tenant``, the event also leaves the tenant's wait list: it moved on another way,
        and a freed slot must wake a real waiter (lua/lib/wake.lua does not look)."""
        own = pipe is None
        p = self.redis.pipeline() if own else pipe
        fields: dict[Any, Any] = {"status": str(status), **(extra or {})}
        if tenant:
            p.zrem(keys.cap_wait(tenant), event_id)
            p.hdel(keys.cap_wait_messages(tenant), event_id)
        p.hset(keys.event(event_id), mapping=fields)
        p.rpush(keys.timeline(event_id), entry)
        p.expire(keys.timeline(event_id), self.retention)
        if status in TERMINAL:
            p.zrem(keys.PENDING, event_id)
        p.hincrby(keys.STATS, outcome, 1)
        if own:
            p.execute()

    def skip(self, event_id: str, reason: str, *, tenant: str = "") -> str:
        self.finish(event_id, Status.SKIPPED, Outcome.SKIPPED,
                    self.entry("skipped", reason=reason), {"reason": reason}, tenant=tenant)
        return Outcome.SKIPPED

    def record_attempt(self, pipe: Any, event_id: str, tracking: dict[Any, Any],
                       entry: str) -> None:
        """Queue on ``pipe``: one attempt's numbers on the record, its line on the timeline."""
        pipe.hset(keys.event(event_id), mapping=tracking)
        pipe.rpush(keys.timeline(event_id), entry)

    def dead_letter(self, event: dict[str, Any], reason_code: str, reason: str, *,
                    rilla_event_id: str = "", status_code: int | None = None,
                    response_body: str = "", payload: dict[str, Any] | None = None) -> str:
        """Give up on ``event``: into the dead-letter store with everything SPEC lists."""
        attempts = int(event.get("attempts") or 0)
        first = float(event.get("first_attempt_at") or 0) or None
        with self.redis.pipeline() as pipe:
            self.dlq.add(pipe, event, reason_code=reason_code, reason=reason,
                         rilla_event_id=rilla_event_id, status_code=status_code,
                         response_body=response_body, payload=payload, attempts=attempts,
                         first_failure_at=first)
            self.finish(event["id"], Status.DEAD, Outcome.DEAD,
                        self.entry("dead_lettered", reason=reason[:300], code=reason_code),
                        {"reason": reason[:300]}, pipe, tenant=str(event.get("tenant") or ""))
            pipe.execute()
        log.warning("dead-lettered", extra={"event": event["id"], "tenant": event.get("tenant"),
                                            "reason_code": reason_code, "reason": reason[:300]})
        return Outcome.DEAD

    # -- not yet ----------------------------------------------------------------------
    def schedule_retry(self, event_id: str, delay: float, status: Status, entry: str,
                       outcome: str, extra: dict[str, Any] | None = None, *,
                       tenant: str = "") -> str:
        """Off the pending index and into the retry set, due in ``delay`` seconds; the
        scheduler queues it again then (``requeue_due``)."""
        due = self.clock.now() + delay
        with self.redis.pipeline() as pipe:
            pipe.zadd(keys.RETRY, {event_id: due})
            pipe.zrem(keys.PENDING, event_id)
            self.finish(event_id, status, outcome, entry,
                        {"next_attempt_at": repr(due), **(extra or {})}, pipe, tenant=tenant)
            pipe.execute()
        return outcome

    def wait_for_slot(self, tenant: str, event_id: str, *, due: float, entry: str,
                      max_inflight: int) -> bool:
        """Put the event on its tenant's wait list, status 'waiting', with a safety retry at
        ``due``; returns whether a waiter (maybe this one) was woken at once."""
        now = self.clock.now()
        return bool(self.scripts.wait(
            keys=[keys.event(event_id), keys.timeline(event_id), keys.STATS,
                  keys.inflight(tenant), keys.cap_wait(tenant), keys.cap_wait_messages(tenant),
                  keys.RETRY, keys.PENDING, QUEUE_EVENTS],
            args=[event_id, process_event_message(event_id, now), repr(due), self.retention,
                  entry, Outcome.BUSY, max_inflight, ms(now)]))

    def wait_for_recording(self, event_id: str) -> str:
        """A CallRail recording lookup was queued for the event; it is queued again when the
        lookup is done (``requeue``)."""
        with self.redis.pipeline() as pipe:
            # Still pending, but far ahead: the lookup may wait hours for budget; if it is
            # ever lost, the sweeper asks again once this score is stale.
            pipe.zadd(keys.PENDING, {event_id: self.clock.now() + 3600})
            self.finish(event_id, Status.WAITING_RECORDING, Outcome.WAITING,
                        self.entry("waiting_recording", note="CallRail recording lookup queued"),
                        pipe=pipe)
            pipe.execute()
        return Outcome.WAITING

    # -- queued again -----------------------------------------------------------------
    def requeue(self, event_id: str, note: str) -> None:
        """Queue an event again now (its recording was resolved)."""
        now = self.clock.now()
        with self.redis.pipeline() as pipe:
            pipe.zadd(keys.PENDING, {event_id: now})
            pipe.hset(keys.event(event_id), "status", str(Status.QUEUED))
            pipe.rpush(keys.timeline(event_id), timeline_entry(now, "queued", note=note))
            pipe.lpush(QUEUE_EVENTS, process_event_message(event_id, now))
            pipe.execute()

    def requeue_due(self, source_key: str, max_score: float, limit: int = 500) -> int:
        """Queue events from ``source_key`` (``keys.RETRY`` or ``keys.PENDING``) scored
        <= ``max_score``; returns how many were queued."""
        raw_ids = self.redis.zrangebyscore(source_key, "-inf", max_score, start=0, num=limit)
        if not raw_ids:
            return 0
        ids = [i.decode() if isinstance(i, bytes) else str(i) for i in raw_ids]
        with self.redis.pipeline(transaction=False) as pipe:
            for eid in ids:
                pipe.hget(keys.event(eid), "tenant")
            tenants = [t.decode() if isinstance(t, bytes) else "" for t in pipe.execute()]
        now = self.clock.now()
        script_keys = [source_key, keys.PENDING, QUEUE_EVENTS]
        args: list[Any] = [repr(now), repr(max_score)]
        for eid, tenant in zip(ids, tenants, strict=True):
            script_keys += [keys.event(eid), keys.cap_wait(tenant),
                            keys.cap_wait_messages(tenant)]
            args += [eid, process_event_message(eid, now)]
        return int(self.scripts.requeue(keys=script_keys, args=args))

    def replay(self, event_id: str) -> bool:
        """Put one dead letter back through the pipeline from its raw event."""
        now = self.clock.now()
        return bool(self.scripts.replay(
            keys=[keys.dead_letter(event_id), keys.DLQ_INDEX, keys.event(event_id),
                  keys.timeline(event_id), keys.PENDING, QUEUE_EVENTS],
            args=[event_id, process_event_message(event_id, now), repr(now), self.retention,
                  timeline_entry(now, "replayed")]))

