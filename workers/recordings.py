"""Resolving CallRail API ``recording.json`` URLs, the one service a delivery and the CallRail
jobs share: a delivery asks for a lookup (``request``); the callrail job that made the request
answers (``resolved`` or ``failed``). Neither side calls the other.
"""

from __future__ import annotations

import math
from typing import Any

from rilla_bridge import keys
from rilla_bridge.calls import CallState
from rilla_bridge.events import EventStore
from rilla_bridge.lifecycle import CallRef, Lifecycle, Outcome, Status
from rilla_bridge.providers import callrail
from rilla_bridge.quota import LANES, QuotaGuard
from rilla_bridge.tenants import Tenant
from rilla_bridge.transform.model import NeedsRecording

# The event waits for its lookup; should the lookup ever be lost, it runs again after this.
LOOKUP_SAFETY_SECONDS = 3600.0


class RecordingService:
    def __init__(self, guard: QuotaGuard, calls: CallState, store: EventStore,
                 lifecycle: Lifecycle, tenant_share: float = 0.5) -> None:
        self.guard = guard
        self.share = tenant_share
        self.calls = calls
        self.store = store
        self.lifecycle = lifecycle

    def request(self, tenant: Tenant, event: dict[str, Any], need: NeedsRecording, *,
                worker: str, call: CallRef) -> str:
        """Queue a lookup behind the quota guard; the event waits for it. Returns the Outcome."""
        cr = tenant.callrail
        if cr is None or not cr.api_enabled or not cr.account_id:
            return self.lifecycle.dead_letter(
                event, "transform",
                "recording is a CallRail API recording.json URL and tenant "
                f"{tenant.slug!r} has no [callrail] account_id/api_key to resolve it",
                worker=worker, call=call)
        wait = self._over_tenant_share(tenant.slug)
        if wait:
            return self.lifecycle.retry(
                event, wait, Status.WAITING_RECORDING, Outcome.WAITING,
                [self.lifecycle.entry("waiting_recording", note="the tenant used its share of "
                                      "the CallRail account's hourly budget for lookups")],
                worker=worker, call=call)
        # Live webhooks go first; calls found by reconciliation/backfill spend their lane.
        lane = event.get("lane") or "live"
        if lane not in LANES:   # a replayed event pays from the backfill share
            lane = "backfill"
        self.guard.submit(cr.account_id, lane, {
            "type": "recording", "tenant": tenant.slug, "event_id": event["id"],
            "call_id": event.get("call_id") or need.call_id, "api_url": need.api_url,
            "cr_call": need.call_id, "tries": 0})
        return self.lifecycle.retry(
            event, LOOKUP_SAFETY_SECONDS, Status.WAITING_RECORDING, Outcome.WAITING,
            [self.lifecycle.entry("waiting_recording", note="CallRail recording lookup queued")],
            worker=worker, call=call)

    def _over_tenant_share(self, tenant: str) -> float:
        """0 while the tenant may look up another recording this hour, else the seconds to
        the next hour (its own cap within the shared account's budget)."""
        now = self.lifecycle.clock.now()
        hour = int(now // 3600)
        cap = max(1, math.ceil(self.guard.hourly_limit * self.share))
        key = keys.lookups(tenant, hour)
        with self.guard.redis.pipeline() as pipe:
            pipe.incr(key)
            pipe.expire(key, 7200)
            used = int(pipe.execute()[0])
        return 0.0 if used <= cap else (hour + 1) * 3600 - now + 1

    def resolved(self, job: dict[str, Any], media_url: str) -> None:
        """The lookup in ``job`` found ``media_url``: remember it and deliver the event again."""
        self.calls.set_resolved(job["tenant"], callrail.NAME, job["call_id"], job["api_url"],
                                media_url)
        self.lifecycle.requeue(job["event_id"], job["tenant"], "recording resolved")

    def failed(self, job: dict[str, Any], reason: str) -> None:
        """The lookup in ``job`` cannot succeed: the event is dead-lettered with ``reason``."""
        event = self.store.get(job["event_id"])
        if event is not None:
            self.lifecycle.dead_letter(event, "recording_lookup", reason, worker="callrail")
