"""What a worker does with one event: plain functions the Celery task hands over to.

receive -> parse (the provider's schema) -> merge into the call's state -> build the Rilla
action -> deliver under the call's lock -> record the outcome: delivered, skipped, retry
scheduled or dead-lettered. Every outcome is a step of ``rilla_bridge.lifecycle`` and lands on
the event's timeline; nothing is dropped silently.
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

from rilla_bridge.clients.rilla import RillaResult
from rilla_bridge.events import decode_event
from rilla_bridge.lifecycle import TERMINAL, Outcome, Status, retry_delay
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
BUSY_REQUEUE_SECONDS = 1.0
# An event waiting for a slot under its tenant's cap is queued by whoever frees one (see
# lua/lib/wake.lua); this late retry only covers a slot that is never released.
CAP_WAIT_SAFETY_SECONDS = 30.0


def process_event(rt: Runtime, event_id: str) -> str:
    """Take one stored event as far as it can go now; returns the Outcome name."""
    raw_event = rt.lifecycle.start(event_id)
    if not raw_event:
        rt.lifecycle.forget(event_id)
        log.warning("event record missing (expired?)", extra={"event": event_id})
        return Outcome.MISSING
    event = decode_event(raw_event)
    if event.get("status") in TERMINAL:
        rt.lifecycle.forget(event_id)  # a stray copy must not keep it pending
        return Outcome.DONE_ALREADY
    tenant = rt.tenants.get(event["tenant"])
    if tenant is None:
        return _dead_letter(rt, event, "config", f"tenant {event['tenant']!r} is not in the "
                            "tenants file any more; restore it and replay")
    source, kind = event["source"], event["kind"]
    try:
        raw = json.loads(event.get("body") or b"")
        if not isinstance(raw, dict):
            raise ValueError("not an object")
    except ValueError:
        return _dead_letter(rt, event, "transform", "stored body is not a JSON object")
    try:
        parsed = parse_event(source, kind, raw)
    except TransformError as exc:
        return _dead_letter(rt, event, "transform", str(exc))
    if isinstance(parsed, Skip):
        return rt.lifecycle.skip(event_id, parsed.reason, tenant=tenant.slug)

    call_id = parsed.call_id
    snapshot = {"rank": parsed.rank, "received_at": float(event["received_at"]),
                "fields": parsed.fields}
    token = secrets.token_hex(8)
    got, state = rt.calls.snapshot_and_acquire(
        tenant.slug, source, call_id, event_id, snapshot, token=token,
        lease_ms=_lease_ms(rt), max_inflight=rt.settings.tenant_max_inflight,
        want_lock=kind in DELIVERY_KINDS)
    if got == 2:
        return rt.lifecycle.skip(
            event_id, f"{kind} event: merged into the call's state, not delivered on its own",
            tenant=tenant.slug)
    if got != 1 or state is None:
        return _busy(rt, event_id, got, tenant.slug)
    return _deliver_locked(rt, event, tenant, call_id, token, state)


def _dead_letter(rt: Runtime, event: dict[str, Any], reason_code: str, reason: str, *,
                 rilla_event_id: str = "", result: RillaResult | None = None,
                 payload: dict[str, Any] | None = None) -> str:
    return rt.lifecycle.dead_letter(
        event, reason_code, reason, rilla_event_id=rilla_event_id,
        status_code=result.status if result else None,
        response_body=(result.body or result.error or "") if result else "", payload=payload)


def _lease_ms(rt: Runtime) -> int:
    return int((rt.settings.rilla_connect_timeout + rt.settings.rilla_read_timeout + 15) * 1000)


def _busy(rt: Runtime, event_id: str, got: int, tenant: str) -> str:
    if got == 0:
        return rt.lifecycle.schedule_retry(
            event_id, BUSY_REQUEUE_SECONDS * (1 + random.random()), Status.WAITING,
            rt.lifecycle.entry("waiting", reason="another delivery of this call"),
            Outcome.BUSY, tenant=tenant)
    # At the tenant's cap: queued again when a slot frees; the retry is only a safety copy.
    rt.lifecycle.wait_for_slot(
        tenant, event_id,
        due=rt.clock.now() + CAP_WAIT_SAFETY_SECONDS * (1 + random.random()),
        entry=rt.lifecycle.entry("waiting", reason="the tenant's in-flight cap: queued when "
                                 "a slot frees"),
        max_inflight=rt.settings.tenant_max_inflight)
    return Outcome.BUSY


def _fingerprint(api_key: str, action: Upsert | Delete) -> str:
    """What Rilla was last sent for a call (by this key): equal fingerprints, nothing new."""
    body = json.dumps(action.payload if isinstance(action, Upsert) else {"delete": action.event_id},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{api_key}\n{body}".encode()).hexdigest()


def _deliver_locked(rt: Runtime, event: dict[str, Any], tenant: Tenant, call_id: str,
                    token: str, state: dict[str, Any]) -> str:
    """Deliver the call's merged state, read under its lock (so Rilla never gets older data
    last), then free the lock and the tenant slot."""
    event_id, source = event["id"], event["source"]
    released = False
    try:
        merged = merge_snapshots(state["snapshots"])
        try:
            action = build_action(source, call_id, merged, tenant, state["resolved"])
        except TransformError as exc:
            return _dead_letter(rt, event, "transform", str(exc),
                                rilla_event_id=event_id_for(source, call_id))
        if isinstance(action, Skip):
            return rt.lifecycle.skip(event_id, action.reason, tenant=tenant.slug)
        if isinstance(action, NeedsRecording):
            return rt.recordings.request(tenant, event, action)
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
    lc = rt.lifecycle
    fp = _fingerprint(tenant.rilla_api_key, action)
    if state.get("delivered") == fp:
        lc.finish(event_id, Status.DELIVERED, Outcome.UNCHANGED,
                  lc.entry("delivered", note="Rilla already has this exact data"),
                  tenant=tenant.slug)
        return Outcome.UNCHANGED, False
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
    tracking: dict[Any, Any] = {"attempts": attempts, "first_attempt_at": repr(first),
                                "last_attempt_at": repr(now), "last_status": result.status or "",
                                "last_payload": json.dumps(payload) if payload is not None else ""}
    event.update(tracking)
    if result.kind == "ok":
        # The common case in one round trip: attempt, outcome, call state, lock release.
        with rt.redis.pipeline() as pipe:
            lc.record_attempt(pipe, event_id, tracking, attempt)
            rt.calls.mark_delivered(pipe, tenant.slug, source, call_id, fp)
            what = "delivered" if payload is not None else "deleted"
            lc.finish(event_id, Status.DELIVERED, Outcome.DELIVERED, lc.entry(what), pipe=pipe,
                      tenant=tenant.slug)
            rt.calls.release(pipe, tenant.slug, source, call_id, token)
            pipe.execute()
        return Outcome.DELIVERED, True
    with rt.redis.pipeline() as pipe:
        lc.record_attempt(pipe, event_id, tracking, attempt)
        pipe.execute()
    if result.kind == "permanent":
        reason = (f"Rilla answered {result.status}: {(result.body or '').strip()[:300]}"
                  if result.status is not None else f"refused before sending: {result.error}")
        return _dead_letter(rt, event, "rilla_rejected", reason, rilla_event_id=rilla_event_id,
                            result=result, payload=payload), False
    age = now - first
    if age >= rt.settings.retry_max_age_seconds:
        reason = (f"gave up after {attempts} attempts over {int(age)}s; last: "
                  f"{result.status or result.error}")
        return _dead_letter(rt, event, "retries_exhausted", reason,
                            rilla_event_id=rilla_event_id, result=result, payload=payload), False
    delay = retry_delay(rt.settings, attempts, result.retry_after)
    delay = min(delay, max(0.0, rt.settings.retry_max_age_seconds - age) + 0.01)
    return lc.schedule_retry(
        event_id, delay, Status.RETRY_SCHEDULED,
        lc.entry("retry_scheduled", in_s=round(delay, 2), after=result.status or result.error),
        Outcome.RETRY, tenant=tenant.slug), False
