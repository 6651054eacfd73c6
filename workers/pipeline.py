"""What a worker does with one event: plain functions the Celery task hands over to.

receive -> parse (marshmallow) -> merge into the call's state -> build the Rilla action ->
deliver under the call's lock -> record the outcome: delivered, skipped, retry scheduled or
dead-lettered. Every outcome lands on the event's timeline; nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from rilla_bridge import redis_conn as keys
from rilla_bridge.dlq import DeadLetters
from rilla_bridge.events import EventStore, timeline_entry
from rilla_bridge.rilla import RillaClient, RillaResult
from rilla_bridge.settings import Settings
from rilla_bridge.tenants import Tenant
from rilla_bridge.transform import (
    DELIVERY_KINDS,
    Delete,
    NeedsRecording,
    Skip,
    TransformError,
    Upsert,
    build_action,
    event_id_for,
    merge_snapshots,
    parse_event,
)
from workers.state import CallState

log = logging.getLogger("rilla_bridge.worker")
TERMINAL = frozenset({"delivered", "skipped", "dead"})
BUSY_REQUEUE_SECONDS = 1.0
# An event waiting for a slot under its tenant's cap is queued by whoever frees one (see
# workers/state.py); this late retry only covers a slot that is never released.
CAP_WAIT_SAFETY_SECONDS = 30.0


@dataclass
class Runtime:
    """Per-process handles the tasks share (one Redis pool, one HTTP session)."""

    settings: Settings
    redis: redis.Redis
    tenants: dict[str, Tenant]
    rilla: RillaClient
    store: EventStore = field(init=False)
    dlq: DeadLetters = field(init=False)
    calls: CallState = field(init=False)
    recording_lookup: Any = None  # callable(tenant, event, NeedsRecording) -> bool, issue 4

    def __post_init__(self) -> None:
        s = self.settings
        self.store = EventStore(self.redis, dedup_window=s.dedup_window_seconds,
                                retention=s.event_retention_seconds)
        self.dlq = DeadLetters(self.redis, retention=s.event_retention_seconds)
        self.calls = CallState(self.redis, s.event_retention_seconds)


class Outcome:
    """Short names for what happened, also the counters in ``rb:stats``."""

    DELIVERED = "delivered"
    UNCHANGED = "unchanged"
    SKIPPED = "skipped"
    RETRY = "retry_scheduled"
    DEAD = "dead_lettered"
    BUSY = "requeued_busy"
    WAITING = "waiting_recording"
    MISSING = "missing"
    DONE_ALREADY = "already_done"


def retry_delay(settings: Settings, attempts: int, retry_after: float | None) -> float:
    """Exponential backoff with equal jitter, capped; never earlier than Retry-After."""
    ceiling = min(settings.retry_max_delay_seconds,
                  # Exponent capped: 2**1024 overflows a float (tiny caps, long max age).
                  settings.retry_base_seconds * (2 ** min(max(0, attempts - 1), 60)))
    delay = ceiling / 2 + random.uniform(0, ceiling / 2)
    if retry_after:
        delay = max(delay, min(retry_after, settings.retry_max_delay_seconds))
    return float(delay)


def _finish(rt: Runtime, event_id: str, status: str, outcome: str, entry: str,
            extra: dict[str, Any] | None = None, pipe: Any = None) -> None:
    own = pipe is None
    p = rt.redis.pipeline() if own else pipe
    fields: dict[Any, Any] = {"status": status, **(extra or {})}
    p.hset(keys.event_key(event_id), mapping=fields)
    p.rpush(keys.timeline_key(event_id), entry)
    p.expire(keys.timeline_key(event_id), rt.settings.event_retention_seconds)
    if status in TERMINAL:
        p.zrem(keys.PENDING, event_id)
    p.hincrby(keys.STATS, outcome, 1)
    if own:
        p.execute()


def dead_letter(rt: Runtime, event: dict[str, Any], reason_code: str, reason: str, *,
                rilla_event_id: str = "", result: RillaResult | None = None,
                payload: dict[str, Any] | None = None) -> str:
    attempts = int(event.get("attempts") or 0)
    first = float(event.get("first_attempt_at") or 0) or None
    with rt.redis.pipeline() as pipe:
        rt.dlq.add(pipe, event, reason_code=reason_code, reason=reason,
                   rilla_event_id=rilla_event_id,
                   status_code=result.status if result else None,
                   response_body=(result.body or result.error or "") if result else "",
                   payload=payload, attempts=attempts, first_failure_at=first)
        _finish(rt, event["id"], "dead", Outcome.DEAD,
                timeline_entry("dead_lettered", reason=reason[:300], code=reason_code),
                {"reason": reason[:300]}, pipe)
        pipe.execute()
    log.warning("dead-lettered", extra={"event": event["id"], "tenant": event.get("tenant"),
                                        "reason_code": reason_code, "reason": reason[:300]})
    return Outcome.DEAD


def _requeue_later(rt: Runtime, event_id: str, delay: float, status: str, entry: str,
                   outcome: str, extra: dict[str, Any] | None = None) -> str:
    due = time.time() + delay
    with rt.redis.pipeline() as pipe:
        pipe.zadd(keys.RETRY, {event_id: due})
        pipe.zrem(keys.PENDING, event_id)
        _finish(rt, event_id, status, outcome, entry, {"next_attempt_at": repr(due),
                                                       **(extra or {})}, pipe)
        pipe.execute()
    return outcome


def process_event(rt: Runtime, event_id: str) -> str:
    """Take one stored event as far as it can go now; returns the Outcome name."""
    # Refresh the pending score: the sweeper must not take a running event for a lost one.
    with rt.redis.pipeline(transaction=False) as pipe:
        pipe.zadd(keys.PENDING, {event_id: time.time()}, xx=True)
        pipe.hgetall(keys.event_key(event_id))
        raw_event = pipe.execute()[1]
    event = rt.store.decode(raw_event) if raw_event else None
    if event is None:
        rt.redis.zrem(keys.PENDING, event_id)
        log.warning("event record missing (expired?)", extra={"event": event_id})
        return Outcome.MISSING
    if event.get("status") in TERMINAL:
        rt.redis.zrem(keys.PENDING, event_id)  # a stray copy must not keep it pending
        return Outcome.DONE_ALREADY
    tenant = rt.tenants.get(event["tenant"])
    if tenant is None:
        return dead_letter(rt, event, "config", f"tenant {event['tenant']!r} is not in the "
                           "tenants file any more; restore it and replay")
    source, kind = event["source"], event["kind"]
    try:
        raw = json.loads(event.get("body") or b"")
        if not isinstance(raw, dict):
            raise ValueError("not an object")
    except ValueError:
        return dead_letter(rt, event, "transform", "stored body is not a JSON object")
    try:
        parsed = parse_event(source, kind, raw)
    except TransformError as exc:
        return dead_letter(rt, event, "transform", str(exc))
    if isinstance(parsed, Skip):
        _finish(rt, event_id, "skipped", Outcome.SKIPPED,
                timeline_entry("skipped", reason=parsed.reason), {"reason": parsed.reason})
        return Outcome.SKIPPED

    call_id = parsed.call_id
    snapshot = {"rank": parsed.rank, "received_at": float(event["received_at"]),
                "fields": parsed.fields}
    token = secrets.token_hex(8)
    got, state = rt.calls.snapshot_and_acquire(
        tenant.slug, source, call_id, event_id, snapshot, token=token,
        lease_ms=_lease_ms(rt), max_inflight=rt.settings.tenant_max_inflight,
        want_lock=kind in DELIVERY_KINDS)
    if got == 2:
        reason = f"{kind} event: merged into the call's state, not delivered on its own"
        _finish(rt, event_id, "skipped", Outcome.SKIPPED,
                timeline_entry("skipped", reason=reason), {"reason": reason})
        return Outcome.SKIPPED
    if got != 1 or state is None:
        return _busy(rt, event_id, got, tenant.slug)
    return _deliver_locked(rt, event, tenant, call_id, token, state)


def _lease_ms(rt: Runtime) -> int:
    return int((rt.settings.rilla_connect_timeout + rt.settings.rilla_read_timeout + 15) * 1000)


def _busy(rt: Runtime, event_id: str, got: int, tenant: str) -> str:
    if got == 0:
        return _requeue_later(rt, event_id, BUSY_REQUEUE_SECONDS * (1 + random.random()),
                              "waiting", timeline_entry("waiting",
                                                        reason="another delivery of this call"),
                              Outcome.BUSY)
    # At the tenant's cap: queued again when a slot frees; the retry is only a safety copy.
    rt.calls.wait_for_slot(
        tenant, event_id, due=time.time() + CAP_WAIT_SAFETY_SECONDS * (1 + random.random()),
        entry=timeline_entry("waiting", reason="the tenant's in-flight cap: queued when a "
                             "slot frees"),
        counter=Outcome.BUSY, max_inflight=rt.settings.tenant_max_inflight,
        retention=rt.settings.event_retention_seconds)
    return Outcome.BUSY


def _fingerprint(api_key: str, action: Upsert | Delete) -> str:
    body = json.dumps(action.payload if isinstance(action, Upsert) else {"delete": action.event_id},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{api_key}\n{body}".encode()).hexdigest()


def deliver(rt: Runtime, event: dict[str, Any], tenant: Tenant, call_id: str) -> str:
    """Deliver the call's merged state under its lock (so Rilla never gets older data last)."""
    token = secrets.token_hex(8)
    got = rt.calls.acquire(tenant.slug, event["source"], call_id, token, _lease_ms(rt),
                           rt.settings.tenant_max_inflight, event_id=event["id"])
    if got != 1:
        return _busy(rt, event["id"], got, tenant.slug)
    # Read the state under the lock: a newer event delivered just before us is included.
    state = rt.calls.get(tenant.slug, event["source"], call_id)
    return _deliver_locked(rt, event, tenant, call_id, token, state)


def _deliver_locked(rt: Runtime, event: dict[str, Any], tenant: Tenant, call_id: str,
                    token: str, state: dict[str, Any]) -> str:
    event_id, source = event["id"], event["source"]
    released = False
    try:
        merged = merge_snapshots(state["snapshots"])
        try:
            action = build_action(source, call_id, merged, tenant, state["resolved"])
        except TransformError as exc:
            return dead_letter(rt, event, "transform", str(exc),
                               rilla_event_id=event_id_for(source, call_id))
        if isinstance(action, Skip):
            _finish(rt, event_id, "skipped", Outcome.SKIPPED,
                    timeline_entry("skipped", reason=action.reason), {"reason": action.reason})
            return Outcome.SKIPPED
        if isinstance(action, NeedsRecording):
            return _needs_recording(rt, event, tenant, action)
        outcome, released = _send(rt, event, tenant, call_id, state, action, token)
        return outcome
    finally:
        if not released:
            # A release lost to a Redis hiccup is harmless: the lease expires on its own.
            try:
                rt.calls.release(rt.redis, tenant.slug, source, call_id, token)
            except redis.RedisError:
                log.warning("could not release call lock", extra={"event": event_id})


def _send(rt: Runtime, event: dict[str, Any], tenant: Tenant, call_id: str,
          state: dict[str, Any], action: Upsert | Delete, token: str) -> tuple[str, bool]:
    """POST/DELETE and record the outcome; returns (outcome, lock already released)."""
    event_id, source = event["id"], event["source"]
    fp = _fingerprint(tenant.rilla_api_key, action)
    if state.get("delivered") == fp:
        _finish(rt, event_id, "delivered", Outcome.UNCHANGED,
                timeline_entry("delivered", note="Rilla already has this exact data"))
        return Outcome.UNCHANGED, False
    now = time.time()
    attempts = int(event.get("attempts") or 0) + 1
    first = float(event.get("first_attempt_at") or 0) or now
    started = time.perf_counter()
    if isinstance(action, Upsert):
        result = rt.rilla.upsert(tenant.rilla_api_key, action.payload)
        payload: dict[str, Any] | None = action.payload
        rilla_event_id = str(action.payload.get("event_id", ""))
    else:
        result = rt.rilla.delete(tenant.rilla_api_key, action.event_id)
        payload, rilla_event_id = None, action.event_id
    ms = round((time.perf_counter() - started) * 1000, 1)
    attempt = timeline_entry(
        "attempt", n=attempts, op="upsert" if payload is not None else "delete",
        status=result.status, body=(result.body or result.error or "")[:200], ms=ms)
    tracking: dict[Any, Any] = {"attempts": attempts, "first_attempt_at": repr(first),
                "last_attempt_at": repr(now), "last_status": result.status or "",
                "last_payload": json.dumps(payload) if payload is not None else ""}
    event.update(tracking)
    if result.kind == "ok":
        # The common case in one round trip: attempt, outcome, call state, lock release.
        with rt.redis.pipeline() as pipe:
            pipe.hset(keys.event_key(event_id), mapping=tracking)
            pipe.rpush(keys.timeline_key(event_id), attempt)
            pipe.hset(keys.call_key(tenant.slug, source, call_id), "delivered", fp)
            what = "delivered" if payload is not None else "deleted"
            _finish(rt, event_id, "delivered", Outcome.DELIVERED, timeline_entry(what), pipe=pipe)
            rt.calls.release(pipe, tenant.slug, source, call_id, token)
            pipe.execute()
        return Outcome.DELIVERED, True
    with rt.redis.pipeline() as pipe:
        pipe.hset(keys.event_key(event_id), mapping=tracking)
        pipe.rpush(keys.timeline_key(event_id), attempt)
        pipe.execute()
    if result.kind == "permanent":
        reason = (f"Rilla answered {result.status}: {(result.body or '').strip()[:300]}"
                  if result.status is not None else f"refused before sending: {result.error}")
        return dead_letter(rt, event, "rilla_rejected", reason, rilla_event_id=rilla_event_id,
                           result=result, payload=payload), False
    age = now - first
    if age >= rt.settings.retry_max_age_seconds:
        reason = (f"gave up after {attempts} attempts over {int(age)}s; last: "
                  f"{result.status or result.error}")
        return dead_letter(rt, event, "retries_exhausted", reason,
                           rilla_event_id=rilla_event_id, result=result, payload=payload), False
    delay = retry_delay(rt.settings, attempts, result.retry_after)
    delay = min(delay, max(0.0, rt.settings.retry_max_age_seconds - age) + 0.01)
    return _requeue_later(
        rt, event_id, delay, "retry_scheduled",
        timeline_entry("retry_scheduled", in_s=round(delay, 2), after=result.status or
                       result.error), Outcome.RETRY), False


def _needs_recording(rt: Runtime, event: dict[str, Any], tenant: Tenant,
                     need: NeedsRecording) -> str:
    cr = tenant.callrail
    if cr is None or not cr.api_enabled or rt.recording_lookup is None:
        return dead_letter(
            rt, event, "transform",
            "recording is a CallRail API recording.json URL and tenant "
            f"{tenant.slug!r} has no [callrail] account_id/api_key to resolve it")
    rt.recording_lookup(tenant, event, need)
    with rt.redis.pipeline() as pipe:
        # Still pending, but far ahead: the lookup may wait hours for budget; if it is ever
        # lost, the sweeper asks again once this score is stale.
        pipe.zadd(keys.PENDING, {event["id"]: time.time() + 3600})
        _finish(rt, event["id"], "waiting_recording", Outcome.WAITING,
                timeline_entry("waiting_recording", note="CallRail recording lookup queued"),
                pipe=pipe)
        pipe.execute()
    return Outcome.WAITING
