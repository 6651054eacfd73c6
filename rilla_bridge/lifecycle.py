"""An event's life: every change of an event's status is made here, and only here.

    received ──▶ queued ──▶ in_flight ──▶ delivered | skipped | dead      (finished)
                  ▲  (a lane)   │  (a worker)
                  │             ├──▶ retry_scheduled    Rilla failed for now: backoff
                  │             ├──▶ waiting            another delivery holds the call
                  │             └──▶ waiting_recording  a CallRail recording lookup is queued
                  └──── a retry came due, a recording was resolved, a lease lapsed, a replay

Redis holds an event only while it is not finished; every step appends its history records
(``history/records.py``) to the ``rb:history`` stream in the same Lua script, and the
``history`` process writes them to SQL. Each step is one script (``lua/``), so several workers
and schedulers can take the same step at once and an event still runs once at a time. Which
event goes next, and when, is ``rilla_bridge.lanes``; what a delivery decides is
``workers/pipeline.py``; the steps themselves live here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import random
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis

from rilla_bridge import keys
from rilla_bridge.celery_messages import QUEUE_EVENTS
from rilla_bridge.clock import Clock, ms
from rilla_bridge.history import records
from rilla_bridge.lanes import Lanes
from rilla_bridge.scripts import Scripts
from rilla_bridge.settings import Settings
from rilla_bridge.tenants import Tenant

log = logging.getLogger("rilla_bridge.lifecycle")
REPLAY_MARKER_SECONDS = 3600   # a replayed event is not replayed again within this
NONE_KEY = "rb:none"           # stands in for a call's keys when an event touched no call


class Status(StrEnum):
    QUEUED = "queued"
    IN_FLIGHT = "in_flight"
    RETRY_SCHEDULED = "retry_scheduled"
    WAITING = "waiting"
    WAITING_RECORDING = "waiting_recording"
    DELIVERED = "delivered"
    SKIPPED = "skipped"
    DEAD = "dead"


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
    STALE = "stale_copy"
    HELD = "held_elsewhere"
    NO_HISTORY = "history_unavailable"


def new_event_id(now: float) -> str:
    """Time-ordered, unguessable: ``ev_`` + milliseconds (hex) + 64 random bits."""
    return f"ev_{int(now * 1000):012x}{secrets.token_hex(8)}"


def retry_delay(settings: Settings, attempts: int, retry_after: float | None) -> float:
    """Exponential backoff with equal jitter, capped; never earlier than Retry-After."""
    ceiling = min(settings.retry_max_delay_seconds,
                  # Exponent capped: 2**1024 overflows a float (tiny caps, long max age).
                  settings.retry_base_seconds * (2 ** min(max(0, attempts - 1), 60)))
    delay = ceiling / 2 + random.uniform(0, ceiling / 2)
    if retry_after:
        delay = max(delay, min(retry_after, settings.retry_max_delay_seconds))
    return float(delay)


# Rilla's answer times (seconds), the buckets of rilla_bridge_rilla_seconds (app/metrics.py).
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def stats_fields(tenant: str, outcome: str, tl: list[dict[str, Any]]) -> dict[str, float]:
    """The counters one settled run adds to ``rb:stats``, labelled by tenant: its outcome,
    and for each attempt Rilla's status and answer time (a histogram, bucket by bucket).
    Every worker process adds to the same hash, so /metrics is right across processes."""
    out: dict[str, float] = {f"outcome|{outcome}|{tenant}": 1}
    for e in tl:
        if e.get("what") != "attempt":
            continue
        key = f"rilla|{e.get('status') or 'none'}|{tenant}"
        out[key] = out.get(key, 0) + 1
        seconds = float(e.get("ms") or 0) / 1000
        le = next((str(b) for b in LATENCY_BUCKETS if seconds <= b), "+Inf")
        for field, n in ((f"latency|{le}|{tenant}", 1), (f"latency_sum|{tenant}", seconds),
                         (f"latency_count|{tenant}", 1)):
            out[field] = out.get(field, 0) + n
    return out


def dedup_digest(source: str, tenant: str, body: bytes) -> str:
    """What identifies a repeated webhook: the body alone, per tenant and source (never the
    unsigned ``?event=`` parameter, which would let a captured body past detection)."""
    digest = hashlib.sha256(b"%s\0%s\0" % (source.encode(), tenant.encode()) + body).digest()
    return base64.urlsafe_b64encode(digest[:16]).decode().rstrip("=")


@dataclass(frozen=True)
class Stored:
    event_id: str
    duplicate: bool
    retry_after: int = 0    # over the tenant's intake limit: nothing stored, wait this long


# A tenant's intake limit: (events per second, body bytes per second).
IntakeLimit = tuple[float, float]


class ClaimCode:
    GONE, STALE, HELD, CLAIMED = 0, 1, 2, 3


@dataclass(frozen=True)
class Claim:
    code: int
    event: dict[str, Any] | None    # the event's fields (body as bytes) when claimed
    queue_length: int
    tenants_ready: int


@dataclass(frozen=True)
class CallRef:
    """The call an event touched in this run, and the lock token when it holds the lock."""

    tenant: str
    source: str
    call_id: str
    lock_token: str = ""


def _decode(raw: Mapping[Any, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in raw.items():
        name = k.decode() if isinstance(k, bytes) else str(k)
        out[name] = v if name == "body" else (v.decode("utf-8", "replace")
                                              if isinstance(v, bytes) else v)
    return out


def make_lifecycle(client: redis.Redis, clock: Clock, settings: Settings,
                   tenants: Mapping[str, Tenant], *,
                   intake_client: Callable[[], redis.Redis] | None = None) -> Lifecycle:
    """A Lifecycle with its own scripts and lanes (the web process, the command line)."""
    scripts = Scripts(client)
    return Lifecycle(client, scripts, clock, settings,
                     Lanes(client, scripts, clock, settings, tenants), intake_client=intake_client)


class Lifecycle:
    """The steps of an event's life, on one Redis client."""

    def __init__(self, client: redis.Redis, scripts: Scripts, clock: Clock,
                 settings: Settings, lanes: Lanes, *,
                 intake_client: Callable[[], redis.Redis] | None = None) -> None:
        self.redis = client
        self.scripts = scripts
        self.clock = clock
        self.settings = settings
        self.lanes = lanes
        # ``receive`` runs on this client when given (the web process: a connection per
        # thread, see redis_conn.ConnectionPerThread), else on ``client``.
        self._intake_client = intake_client
        self.dedup_window = max(1, settings.dedup_window_seconds)

    def entry(self, what: str, **data: Any) -> dict[str, Any]:
        """One timeline entry: when, what, and its details."""
        return {"t": round(self.clock.now(), 3), "what": what, **data}

    # -- received ---------------------------------------------------------------------
    def receive(self, *, source: str, tenant: str, kind: str, body: bytes,
                call_id: str | None, keep: bool = True, lane: str = "live",
                note: str = "", limit: IntakeLimit | None = None) -> Stored:
        """Store one received body durably, with its history record, in its tenant's lane
        (one script); ``keep=False`` records it as skipped without its body (lead events).
        Raises ``redis.RedisError`` when Redis can't take it. A body seen within the dedup
        window is not stored again: the answer names the first event. Over the tenant's
        intake ``limit`` nothing is stored: the answer says how long to wait."""
        now = self.clock.now()
        event_id = new_event_id(now)
        status = Status.QUEUED if keep else Status.SKIPPED
        rec = records.encode({
            "id": event_id, "tenant": tenant, "source": source, "kind": kind,
            "call_id": call_id, "received_at": now, "size": len(body),
            "sha256": hashlib.sha256(body).hexdigest(), "status": str(status), "note": note,
            "lane": lane, "kept": keep})
        client = self._intake_client() if self._intake_client else None
        script_keys = [keys.dedup(dedup_digest(source, tenant, body)), keys.event(event_id),
                       keys.HISTORY, keys.open_events(tenant), keys.TENANTS,
                       keys.intake_limit(tenant), keys.LAST_WEBHOOK, *self.lanes.keys(tenant)]
        args = [event_id, self.dedup_window, ms(now), repr(now), source, kind, call_id or "",
                body if keep else b"", "1" if keep else "0", lane, rec,
                repr(limit[0]) if limit else "", repr(limit[1]) if limit else "", len(body),
                *self.lanes.args(tenant)]
        try:
            code, stored_id = self.scripts.intake(keys=script_keys, args=args, client=client)
        except redis.ConnectionError:
            if client is None:
                raise
            # A single connection is not checked before use as a pooled one is, so after a
            # Redis restart the first command meets the closed socket (and redis-py 8 does
            # not retry it). It is disconnected now: one more try connects afresh. Had the
            # first try reached Redis, this one is answered as its duplicate, same id.
            code, stored_id = self.scripts.intake(keys=script_keys, args=args, client=client)
        if int(code) < 0:
            return Stored(event_id="", duplicate=False, retry_after=int(stored_id))
        sid = stored_id.decode() if isinstance(stored_id, bytes) else str(stored_id)
        return Stored(event_id=sid, duplicate=not code)

    def take_intake(self, tenant: str, size: int, limit: IntakeLimit) -> int:
        """Count a webhook that will not be stored (a bad body) against the tenant's intake
        limit; returns 0, or the seconds to wait when the tenant is over it."""
        client = self._intake_client() if self._intake_client else None
        return int(self.scripts.limit(keys=[keys.intake_limit(tenant)],
                                      args=[repr(self.clock.now()), repr(limit[0]),
                                            repr(limit[1]), size], client=client))

    # -- a worker takes it -------------------------------------------------------------
    def claim(self, event_id: str, tenant: str, worker: str) -> Claim:
        """Take a dispatched event for this worker (see lua/claim.lua)."""
        reply = self.scripts.claim(
            keys=[keys.event(event_id), keys.inflight(tenant), QUEUE_EVENTS, keys.READY],
            args=[event_id, worker, ms(self.clock.now()),
                  ms(self.settings.delivery_lease_seconds)])
        code, qlen, ready = int(reply[0]), int(reply[1]), int(reply[2])
        event = None
        if code == ClaimCode.CLAIMED:
            flat = reply[3]
            event = _decode(dict(zip(flat[::2], flat[1::2], strict=True)))
            event["id"] = event_id
        return Claim(code, event, qlen, ready)

    # -- the end of a run --------------------------------------------------------------
    def _settle(self, event: Mapping[str, Any], *, worker: str, mode: str, outcome: str,
                step: dict[str, Any], dead: dict[str, Any] | None = None,
                call: CallRef | None = None, delivered: str = "", due: float = 0.0,
                keep: Mapping[str, str] | None = None, status: Status | None = None) -> str:
        tenant = str(event["tenant"])
        head = (records.encode({"tenant": call.tenant, "source": call.source,
                                "call_id": call.call_id}) if call else "")
        mine = self.scripts.settle(
            keys=[keys.event(event["id"]), keys.HISTORY, keys.STATS, keys.open_events(tenant),
                  keys.retry(tenant), keys.bulk_retry(tenant),
                  keys.call(call.tenant, call.source, call.call_id) if call else NONE_KEY,
                  keys.call_lock(call.tenant, call.source, call.call_id) if call else NONE_KEY,
                  *self.lanes.keys(tenant)],
            args=[event["id"], ms(self.clock.now()), mode,
                  json.dumps(stats_fields(tenant, outcome, step["tl"])), records.encode(step),
                  records.encode(dead) if dead else "", call.lock_token if call else "", head,
                  delivered, repr(due), json.dumps(dict(keep or {})), str(status or ""),
                  worker, *self.lanes.args(tenant)])
        # Not this run's any more (its lease lapsed): only its timeline was recorded.
        return outcome if int(mine) else Outcome.HELD

    def _step(self, event: Mapping[str, Any], status: Status | None, tl: list[dict[str, Any]],
              fields: Mapping[str, Any] | None = None) -> dict[str, Any]:
        now = self.clock.now()
        set_: dict[str, Any] = dict(fields or {})
        if status in TERMINAL:
            set_["finished_at"] = now
        return {"id": event["id"], "at": now, "status": str(status) if status else None,
                "set": set_, "tl": tl}

    def finish(self, event: Mapping[str, Any], status: Status, outcome: str,
               tl: list[dict[str, Any]], *, worker: str, fields: Mapping[str, Any] | None = None,
               call: CallRef | None = None, delivered: str = "",
               dead: dict[str, Any] | None = None) -> str:
        """The event is finished (delivered, skipped or dead): its history goes out, its
        Redis record, slot and lock go, and its tenant's next event is dispatched."""
        return self._settle(event, worker=worker, mode="finish", outcome=outcome,
                            step=self._step(event, status, tl, fields), dead=dead, call=call,
                            delivered=delivered)

    def skip(self, event: Mapping[str, Any], reason: str, *, worker: str,
             call: CallRef | None = None) -> str:
        return self.finish(event, Status.SKIPPED, Outcome.SKIPPED,
                           [self.entry("skipped", reason=reason)], worker=worker,
                           fields={"reason": reason}, call=call)

    def dead_letter(self, event: Mapping[str, Any], reason_code: str, reason: str, *,
                    worker: str, rilla_event_id: str = "", status_code: int | None = None,
                    response_body: str = "", payload: dict[str, Any] | None = None,
                    call: CallRef | None = None, tl: list[dict[str, Any]] | None = None,
                    fields: Mapping[str, Any] | None = None) -> str:
        """Give up on ``event``: a dead letter with everything SPEC lists, kept in history
        until an operator replays or deletes it."""
        now = self.clock.now()
        attempts = int(event.get("attempts") or 0)
        first = float(event.get("first_attempt_at") or 0) or None
        if payload is None and event.get("last_payload"):
            payload = json.loads(event["last_payload"])   # the last one sent, earlier
        dead = {"id": event["id"], "tenant": event.get("tenant"), "source": event.get("source"),
                "kind": event.get("kind"), "call_id": event.get("call_id") or None,
                "rilla_event_id": rilla_event_id, "reason_code": reason_code,
                "reason": reason[:1000], "status_code": status_code,
                "response_body": response_body[:2000], "attempts": attempts,
                "first_failure_at": first or now, "failed_at": now, "payload": payload}
        entries = [*(tl or []), self.entry("dead_lettered", reason=reason[:300],
                                           code=reason_code)]
        outcome = self.finish(event, Status.DEAD, Outcome.DEAD, entries, worker=worker,
                              fields={**(fields or {}), "reason": reason[:300]}, call=call,
                              dead=dead)
        log.warning("dead-lettered", extra={"event": event["id"], "tenant": event.get("tenant"),
                                            "reason_code": reason_code, "reason": reason[:300]})
        return outcome

    def retry(self, event: Mapping[str, Any], delay: float, status: Status, outcome: str,
              tl: list[dict[str, Any]], *, worker: str, keep: Mapping[str, str] | None = None,
              fields: Mapping[str, Any] | None = None, call: CallRef | None = None) -> str:
        """Not finished: the event waits ``delay`` seconds in its tenant's retry set (the
        scheduler puts it back at the head of its lane when due), keeping ``keep`` on its
        Redis record for its next attempt."""
        due = self.clock.now() + delay
        return self._settle(event, worker=worker, mode="retry", outcome=outcome,
                            step=self._step(event, status, tl,
                                            {**(fields or {}), "next_attempt_at": due}),
                            call=call, due=due, keep=keep, status=status)

    # -- back in line ------------------------------------------------------------------
    def requeue(self, event_id: str, tenant: str, note: str) -> bool:
        """An event waiting in its retry set goes to the head of its lane now (its recording
        was resolved; an operator's "retry now")."""
        step = {"id": event_id, "at": self.clock.now(), "status": str(Status.QUEUED),
                "set": {}, "tl": [self.entry("queued", note=note)]}
        return bool(self.scripts.requeue(
            keys=[keys.event(event_id), keys.HISTORY, keys.retry(tenant),
                  keys.bulk_retry(tenant), *self.lanes.keys(tenant)],
            args=[event_id, ms(self.clock.now()), records.encode(step),
                  *self.lanes.args(tenant)]))

    def replay(self, dead: Mapping[str, Any], actor: str) -> bool:
        """Run a dead letter again from its raw event (``dead``: id, tenant, source, kind,
        call_id, received_at, body, as history has them); False when it is in progress or
        was replayed within the hour. The tenants file as it is now applies."""
        event_id, tenant = str(dead["id"]), str(dead["tenant"])
        now = self.clock.now()
        step = {"id": event_id, "at": now, "status": str(Status.QUEUED),
                "set": {"reason": None, "finished_at": None, "attempts": 0},
                "tl": [self.entry("replayed", by=actor)]}
        handled = {"id": event_id, "how": "replayed", "at": now, "by": actor}
        body = dead.get("body") or b""
        return bool(self.scripts.replay(
            keys=[keys.event(event_id), keys.HISTORY, keys.open_events(tenant), keys.TENANTS,
                  keys.replayed(event_id), *self.lanes.keys(tenant)],
            args=[event_id, ms(now), dead["source"], dead["kind"], dead.get("call_id") or "",
                  repr(float(dead["received_at"])), body, records.encode(step),
                  records.encode(handled), REPLAY_MARKER_SECONDS, *self.lanes.args(tenant)]))

    def hand_back(self, event_id: str, tenant: str, run: str, reason: str, *,
                  lock_key: str = NONE_KEY, lock_token: str = "") -> bool:
        """The run ``run`` of an in-flight event stops before it settled (its worker shuts
        down, its time limit): the event goes back to the head of its tenant's lane and is
        dispatched again at once, its slot and the call's lock freed, without waiting for its
        lease to lapse. False when the run no longer holds it (settled, or lapsed already)."""
        now = self.clock.now()
        step = {"id": event_id, "at": now, "status": str(Status.QUEUED), "set": {},
                "tl": [self.entry("requeued", reason=reason)]}
        return bool(self.scripts.handback(
            keys=[keys.event(event_id), keys.HISTORY, lock_key, *self.lanes.keys(tenant)],
            args=[event_id, ms(now), run, lock_token, records.encode(step),
                  *self.lanes.args(tenant)]))

    # -- operators ---------------------------------------------------------------------
    def delete_dead_letters(self, event_ids: list[str], actor: str) -> int:
        """Close dead letters without replaying them (history keeps the event)."""
        now = self.clock.now()
        with self.redis.pipeline(transaction=False) as pipe:
            for eid in event_ids:
                pipe.xadd(keys.HISTORY, {"r": records.HANDLED, "d": records.encode(
                    {"id": eid, "how": "deleted", "at": now, "by": actor})})
            pipe.execute()
        return len(event_ids)

    def audit(self, actor: str, action: str, selection: Mapping[str, Any], count: int,
              detail: str = "") -> None:
        """An operator action for the audit log (console, API or command line)."""
        self.redis.xadd(keys.HISTORY, {"r": records.AUDIT, "d": records.encode({
            "at": self.clock.now(), "actor": actor, "action": action,
            "selection": dict(selection), "count": count, "detail": detail})})
