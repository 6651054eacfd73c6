"""What a worker does with one event: plain functions the Celery task hands over to.

claim -> parse (the provider's schema) -> merge into the call's state -> build the Rilla
action -> deliver under the call's lock -> settle: delivered, skipped, retry scheduled or
dead-lettered. Every outcome is a step of ``rilla_bridge.lifecycle`` that lands on the event's
timeline in history; nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import secrets
import time
from typing import Any

import redis

from rilla_bridge import keys
from rilla_bridge.calls import BUSY, LOCKED, RELOAD, STORED
from rilla_bridge.clients.rilla import RillaResult
from rilla_bridge.jsonbody import parse_object
from rilla_bridge.lifecycle import CallRef, ClaimCode, Outcome, Status, retry_delay
from rilla_bridge.providers import DELIVERY_KINDS, parse_event
from rilla_bridge.tenants import Tenant
from rilla_bridge.transform.build import build_action
from rilla_bridge.transform.merge import merge_snapshots
from rilla_bridge.transform.model import (
    Delete,
    NeedsRecording,
    Skip,
    TransformError,
    Upsert,
    event_id_for,
)
from workers.runtime import Runtime

log = logging.getLogger("rilla_bridge.worker")
BUSY_REQUEUE_SECONDS = 1.0       # another delivery of the same call holds its lock
NO_HISTORY_RETRY_SECONDS = 30.0  # the call's earlier state is in a database that did not answer
_CLAIM_OUTCOMES = {ClaimCode.GONE: Outcome.MISSING, ClaimCode.STALE: Outcome.STALE,
                   ClaimCode.HELD: Outcome.HELD}


def process_event(rt: Runtime, event_id: str, tenant: str) -> str:
    """Take one dispatched event as far as it can go now; returns the Outcome name."""
    run = rt.heartbeat.run_token()
    claim = rt.lifecycle.claim(event_id, tenant, run)
    if claim.event is None:
        return _CLAIM_OUTCOMES[claim.code]
    if claim.tenants_ready and claim.queue_length < rt.settings.dispatch_queue_max:
        # Tenants wait for room in the queue, and this run just made some: fill it in turn.
        try:
            rt.lanes.refill()
        except redis.RedisError as exc:
            log.warning("could not refill the queue", extra={"error": repr(exc)})
    rt.heartbeat.hold(event_id, tenant, run)
    try:
        return _run(rt, claim.event, run)
    except BaseException as exc:
        # Cut off from outside (the task time limit: gevent's Timeout; the worker stopping:
        # GreenletExit, SystemExit): the event goes back to its lane now, not after its lease
        # lapses. An error of our own (an Exception) is left to the lease: its lapse is the
        # pause before the event is tried again.
        if not isinstance(exc, Exception):
            hand_back(rt, event_id, f"its run was stopped ({type(exc).__name__}) before it "
                      "finished")
        raise
    finally:
        rt.heartbeat.release(event_id)


def hand_back(rt: Runtime, event_id: str, reason: str) -> bool:
    """Hand one event this process runs back to its tenant's lane (``Lifecycle.hand_back``);
    False when it holds it no more. A Redis error leaves it to its lease."""
    held = rt.heartbeat.take(event_id)
    if held is None:
        return False
    try:
        return rt.lifecycle.hand_back(event_id, held.tenant, held.run, reason,
                                      lock_key=held.lock_key, lock_token=held.lock_token)
    except redis.RedisError as exc:
        log.warning("could not hand an event back", extra={"event": event_id,
                                                           "error": repr(exc)})
        return False


def hand_back_all(rt: Runtime, reason: str) -> int:
    """Hand back everything this process still runs (it is stopping); returns how many."""
    return rt.heartbeat.hand_back_all(
        lambda event_id, tenant, run, lock_key, lock_token: rt.lifecycle.hand_back(
            event_id, tenant, run, reason, lock_key=lock_key, lock_token=lock_token))


def _run(rt: Runtime, event: dict[str, Any], worker: str) -> str:
    lc = rt.lifecycle
    tenant = rt.tenants.get(event["tenant"])
    if tenant is None:
        return lc.dead_letter(event, "config", f"tenant {event['tenant']!r} is not in the "
                              "tenants file any more; restore it and replay", worker=worker)
    source, kind = event["source"], event["kind"]
    raw = parse_object(event.get("body") or b"")
    if isinstance(raw, str):
        return lc.dead_letter(event, "transform", f"stored body: {raw}", worker=worker)
    try:
        parsed = parse_event(source, kind, raw)
    except TransformError as exc:
        return lc.dead_letter(event, "transform", str(exc), worker=worker)
    if isinstance(parsed, Skip):
        return lc.skip(event, parsed.reason, worker=worker)

    call_id = parsed.call_id
    call = CallRef(tenant.slug, source, call_id)
    snapshot = {"rank": parsed.rank, "received_at": float(event["received_at"]),
                "fields": parsed.fields}
    token = secrets.token_hex(8)
    lease_ms = int(rt.settings.delivery_lease_seconds * 1000)
    want_lock = kind in DELIVERY_KINDS
    got, state = rt.calls.snapshot_and_acquire(
        tenant.slug, source, call_id, event["id"], snapshot, token=token, lease_ms=lease_ms,
        want_lock=want_lock)
    if got == RELOAD:
        # Earlier events of this call were handed to history: merge with them, never blank.
        try:
            fields = rt.call_history(tenant.slug, source, call_id)
        except Exception as exc:  # the database's own errors vary by driver
            log.warning("history unavailable for a call's earlier events",
                        extra={"event": event["id"], "error": type(exc).__name__})
            return lc.retry(
                event, NO_HISTORY_RETRY_SECONDS * (1 + random.random()), Status.WAITING,
                Outcome.NO_HISTORY, [lc.entry("waiting", reason="the call's earlier events "
                                              "are in the history database, which did not "
                                              "answer")], worker=worker)
        rt.calls.restore(tenant.slug, source, call_id, fields)
        got, state = rt.calls.snapshot_and_acquire(
            tenant.slug, source, call_id, event["id"], snapshot, token=token,
            lease_ms=lease_ms, want_lock=want_lock, check_history=False)
    if got == STORED:
        return lc.skip(event, f"{kind} event: merged into the call's state, not delivered on "
                       "its own", worker=worker, call=call)
    if got == BUSY or state is None:
        return lc.retry(event, BUSY_REQUEUE_SECONDS * (1 + random.random()), Status.WAITING,
                        Outcome.BUSY, [lc.entry("waiting", reason="another delivery of this "
                                                "call")], worker=worker, call=call)
    assert got == LOCKED
    locked = CallRef(tenant.slug, source, call_id, token)
    rt.heartbeat.hold_lock(event["id"], keys.call_lock(tenant.slug, source, call_id), token)
    return _deliver_locked(rt, event, tenant, locked, state, worker)


def _fingerprint(api_key: str, action: Upsert | Delete) -> str:
    """What Rilla was last sent for a call (by this key): equal fingerprints, nothing new."""
    body = json.dumps(action.payload if isinstance(action, Upsert) else {"delete": action.event_id},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{api_key}\n{body}".encode()).hexdigest()


def _deliver_locked(rt: Runtime, event: dict[str, Any], tenant: Tenant, call: CallRef,
                    state: dict[str, Any], worker: str) -> str:
    """Deliver the call's merged state, read under its lock (so Rilla never gets older data
    last); settling the event frees the lock and the slot."""
    lc = rt.lifecycle
    merged = merge_snapshots(state["snapshots"])
    try:
        action = build_action(call.source, call.call_id, merged, tenant, state["resolved"])
    except TransformError as exc:
        return lc.dead_letter(event, "transform", str(exc), worker=worker, call=call,
                              rilla_event_id=event_id_for(call.source, call.call_id))
    if isinstance(action, Skip):
        return lc.skip(event, action.reason, worker=worker, call=call)
    if isinstance(action, NeedsRecording):
        return rt.recordings.request(tenant, event, action, worker=worker, call=call)
    return _send(rt, event, tenant, call, state, action, worker)


def _send(rt: Runtime, event: dict[str, Any], tenant: Tenant, call: CallRef,
          state: dict[str, Any], action: Upsert | Delete, worker: str) -> str:
    """POST/DELETE and settle the event by Rilla's answer."""
    lc = rt.lifecycle
    # What the transform mended on the way (a truncated field, a fallback rep) is said once,
    # on the timeline of the run that sends it.
    noted = [lc.entry("note", text=n) for n in action.notes] if isinstance(action, Upsert) else []
    fp = _fingerprint(tenant.rilla_api_key, action)
    if state.get("delivered") == fp:
        return lc.finish(event, Status.DELIVERED, Outcome.UNCHANGED,
                         [lc.entry("delivered", note="Rilla already has this exact data")],
                         worker=worker, call=call)
    now = rt.clock.now()
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
    took_ms = round((time.perf_counter() - started) * 1000, 1)
    attempt = lc.entry(
        "attempt", n=attempts, op="upsert" if payload is not None else "delete",
        status=result.status, body=(result.body or result.error or "")[:200], ms=took_ms)
    tried = [*noted, attempt]
    payload_text = json.dumps(payload) if payload is not None else ""
    tracking: dict[str, Any] = {"attempts": attempts, "first_attempt_at": first,
                                "last_attempt_at": now, "last_status": result.status,
                                "last_payload": payload_text or None}
    event.update(attempts=attempts, first_attempt_at=first)
    if result.kind == "ok":
        what = "delivered" if payload is not None else "deleted"
        return lc.finish(event, Status.DELIVERED, Outcome.DELIVERED, [*tried, lc.entry(what)],
                         worker=worker, fields=tracking, call=call, delivered=fp)
    if result.kind == "permanent":
        reason = (f"Rilla answered {result.status}: {(result.body or '').strip()[:300]}"
                  if result.status is not None else f"refused before sending: {result.error}")
        return _dead(rt, event, "rilla_rejected", reason, result, payload, rilla_event_id,
                     call, tried, tracking, worker)
    age = now - first
    if age >= rt.settings.retry_max_age_seconds:
        reason = (f"gave up after {attempts} attempts over {int(age)}s; last: "
                  f"{result.status or result.error}")
        return _dead(rt, event, "retries_exhausted", reason, result, payload, rilla_event_id,
                     call, tried, tracking, worker)
    delay = retry_delay(rt.settings, attempts, result.retry_after)
    delay = min(delay, max(0.0, rt.settings.retry_max_age_seconds - age) + 0.01)
    keep = {"attempts": str(attempts), "first_attempt_at": repr(first),
            "last_payload": payload_text}
    return lc.retry(event, delay, Status.RETRY_SCHEDULED, Outcome.RETRY,
                    [*tried, lc.entry("retry_scheduled", in_s=round(delay, 2),
                                       after=result.status or result.error)],
                    worker=worker, keep=keep, fields=tracking, call=call)


def _dead(rt: Runtime, event: dict[str, Any], code: str, reason: str, result: RillaResult,
          payload: dict[str, Any] | None, rilla_event_id: str, call: CallRef,
          tl: list[dict[str, Any]], tracking: dict[str, Any], worker: str) -> str:
    return rt.lifecycle.dead_letter(
        event, code, reason, worker=worker, rilla_event_id=rilla_event_id,
        status_code=result.status, response_body=result.body or result.error or "",
        payload=payload, call=call, tl=tl, fields=tracking)
