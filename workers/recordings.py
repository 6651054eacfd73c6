"""Resolving CallRail API ``recording.json`` URLs, the one service a delivery and the CallRail
jobs share: a delivery asks for a lookup (``request``); the callrail job that made the request
answers (``resolved`` or ``failed``). Neither side calls the other.
"""

from __future__ import annotations

from typing import Any

from rilla_bridge.calls import CallState
from rilla_bridge.events import EventStore
from rilla_bridge.lifecycle import Lifecycle
from rilla_bridge.providers import callrail
from rilla_bridge.quota import QuotaGuard
from rilla_bridge.tenants import Tenant
from rilla_bridge.transform.model import NeedsRecording


class RecordingService:
    def __init__(self, guard: QuotaGuard, calls: CallState, store: EventStore,
                 lifecycle: Lifecycle) -> None:
        self.guard = guard
        self.calls = calls
        self.store = store
        self.lifecycle = lifecycle

    def request(self, tenant: Tenant, event: dict[str, Any], need: NeedsRecording) -> str:
        """Queue a lookup behind the quota guard; the event waits for it. Returns the Outcome."""
        cr = tenant.callrail
        if cr is None or not cr.api_enabled or not cr.account_id:
            return self.lifecycle.dead_letter(
                event, "transform",
                "recording is a CallRail API recording.json URL and tenant "
                f"{tenant.slug!r} has no [callrail] account_id/api_key to resolve it")
        # Live webhooks go first; calls found by reconciliation/backfill spend their lane.
        lane = event.get("lane") or "live"
        self.guard.submit(cr.account_id, lane, {
            "type": "recording", "tenant": tenant.slug, "event_id": event["id"],
            "call_id": event.get("call_id") or need.call_id, "api_url": need.api_url,
            "cr_call": need.call_id, "tries": 0})
        return self.lifecycle.wait_for_recording(event["id"])

    def resolved(self, job: dict[str, Any], media_url: str) -> None:
        """The lookup in ``job`` found ``media_url``: remember it and deliver the event again."""
        self.calls.set_resolved(job["tenant"], callrail.NAME, job["call_id"], job["api_url"],
                                media_url)
        self.lifecycle.requeue(job["event_id"], "recording resolved")

    def failed(self, job: dict[str, Any], reason: str) -> None:
        """The lookup in ``job`` cannot succeed: the event is dead-lettered with ``reason``."""
        event = self.store.get(job["event_id"])
        if event is not None:
            self.lifecycle.dead_letter(event, "recording_lookup", reason)
