"""Fakes and builders shared by the tests (no test module imports another's helpers).

``FakeRilla`` stands in for ``rilla_bridge.clients.rilla.RillaClient``;
``tests/unit/rilla_bridge/clients/test_rilla_contract.py`` runs the same contract against the
real client over the fake and over the sandbox, so the fake stays honest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any

import redis
from sentry_sdk.envelope import Envelope
from sentry_sdk.transport import Transport

from rilla_bridge.clients.rilla import RillaResult, classify
from rilla_bridge.clock import FakeClock
from rilla_bridge.history.records import (
    AUDIT,
    CALL,
    DEAD,
    HANDLED,
    RECEIVED,
    STEP,
    Record,
    encode,
)
from rilla_bridge.providers import parse_event
from rilla_bridge.settings import Settings
from rilla_bridge.tenants import Tenant, parse_tenants
from rilla_bridge.transform.build import Action, build_action
from rilla_bridge.transform.merge import merge_snapshots
from rilla_bridge.transform.model import Skip, Snapshot
from workers.runtime import Runtime, build_runtime

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ACME_KEY = "acme-rilla-key-000001"
BETA_KEY = "beta-rilla-key-000002"

TENANTS = f"""
[tenants.acme]
rilla_api_key = "{ACME_KEY}"
default_user_email = "office@acme.example"
[tenants.acme.users]
"mike@acme.example" = "mike.r@acme.example"
[tenants.acme.callrail]
signing_key = "acme-signing-key-0001"

[tenants.beta]
rilla_api_key = "{BETA_KEY}"
[tenants.beta.callrail]
signing_key = "beta-signing-key-0002"
[tenants.beta.callingly]
webhook_token = "beta-callingly-token-02"
"""


def load(source: str, name: str) -> dict[str, Any]:
    """A real-shaped webhook body from ``tests/fixtures/<source>/<name>.json``."""
    body: dict[str, Any] = json.loads((FIXTURES / source / f"{name}.json").read_bytes())
    return body


class FakeRilla:
    """Rilla's Custom CRM API as ``RillaClient`` reports it, without HTTP: it answers what the
    Rilla sandbox (``sandbox/rilla.py``) answers through the real client, and
    ``tests/unit/rilla_bridge/clients/test_rilla_contract.py`` checks that it does.

    ``script`` answers the next calls first, as a sandbox fault does (nothing is stored);
    ``fail`` scripts answers as the client classifies them. ``users`` (if set) is the org's
    allowed rep emails (compared trimmed and case-blind, as Rilla does); every API key is
    taken for an org's. ``appointments`` holds what was stored, per API key and event id.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.script: list[RillaResult] = []
        self.users: set[str] | None = None
        self.appointments: dict[str, dict[str, dict[str, Any]]] = {}

    def fail(self, status: int, *, body: str | None = None, retry_after: str | None = None,
             count: int = 1) -> None:
        """Answer the next ``count`` calls with ``status`` (body: the status phrase, as the
        sandbox's faults), classified as the client classifies it."""
        text = body if body is not None else HTTPStatus(status).phrase
        self.script += [classify(status, text, retry_after)] * count

    def upsert(self, api_key: str, payload: Mapping[str, Any]) -> RillaResult:
        try:
            body = json.loads(json.dumps(payload, allow_nan=False))
        except (TypeError, ValueError) as exc:
            self.calls.append(("upsert", api_key, None))
            return RillaResult("permanent", None, "",
                               error=f"payload is not JSON serializable: {exc}")
        self.calls.append(("upsert", api_key, body))
        if self.script:
            return self.script.pop(0)
        try:
            message = self._store(api_key, body)
        except _Refused as exc:
            return RillaResult("permanent", exc.status, exc.body)
        return RillaResult("ok", 200, json.dumps({"message": message}))

    def delete(self, api_key: str, event_id: str) -> RillaResult:
        self.calls.append(("delete", api_key, event_id))
        if not event_id:
            return RillaResult("permanent", None, "", error="empty event_id")
        if self.script:
            return self.script.pop(0)
        if self.appointments.get(api_key, {}).pop(event_id, None) is None:
            return RillaResult("ok", 404, "Appointment not found")   # already gone: deleted
        return RillaResult("ok", 200, json.dumps({"message": "Successfully deleted appointment"}))

    @property
    def upserts(self) -> list[dict[str, Any]]:
        return [c[2] for c in self.calls if c[0] == "upsert"]

    def _store(self, api_key: str, body: dict[str, Any]) -> str:
        """The sandbox's rules, in its order: required fields, then formats, then the rep."""
        if not _text(body.get("event_id")) or not _text(body.get("user_email")):
            raise _Refused(400, _MISSING)
        appts = self.appointments.setdefault(api_key, {})
        existing = appts.get(body["event_id"])
        if existing is None:
            customer = body.get("customer")
            if (any(not _text(body.get(f)) for f in ("start_time", "end_time", "title"))
                    or not isinstance(customer, dict)
                    or not _text(customer.get("id")) or not _text(customer.get("name"))):
                raise _Refused(400, _MISSING)
        merged = dict(existing or {})
        for key, value in body.items():
            if key == "customer" and isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        for name in ("start_time", "end_time"):
            if name in body and not _rilla_time(body[name]):
                raise _Refused(400, f"Invalid {name}: expected yyyy-mm-dd hh:mm:ss (UTC)")
        if "customer" in body and not isinstance(body["customer"], dict):
            raise _Refused(400, _MISSING)
        recording_type = merged.get("recording_type")
        if merged.get("media_url") and recording_type is None:
            raise _Refused(400, "recording_type is required when media_url is provided")
        if recording_type is not None and recording_type not in _RECORDING_TYPES:
            raise _Refused(400, "Invalid recording_type")
        if recording_type == "CALL_AUDIO_WITH_LOCATION" and not _text(merged.get("location")):
            raise _Refused(400, "location is required for CALL_AUDIO_WITH_LOCATION")
        if self.users is not None and body["user_email"].strip().lower() not in {
                u.strip().lower() for u in self.users}:
            raise _Refused(422, "User email is not in Rilla")
        appts[body["event_id"]] = merged
        return f"Successfully {'updated' if existing else 'created'} appointment"


_MISSING = "Missing some required parameters in the body"
_RECORDING_TYPES = frozenset({"CALL_AUDIO", "APPOINTMENT_AUDIO", "CALL_AUDIO_WITH_LOCATION"})


class _Refused(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(status, body)
        self.status = status
        self.body = body


def _text(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _rilla_time(value: Any) -> bool:
    if not isinstance(value, str) or len(value) != 19:
        return False
    try:
        datetime.strptime(value, "%Y-%m-%d %H:%M:%S")
    except ValueError:
        return False
    return True


def make_runtime(client: redis.Redis, clock: FakeClock | None = None,
                 tenants: str = TENANTS, **settings: Any) -> Runtime:
    """A worker Runtime over ``client`` with a FakeRilla, a FakeClock and test settings."""
    values: dict[str, Any] = {"retry_base_seconds": 5.0, "retry_max_delay_seconds": 60.0,
                              "retry_max_age_seconds": 3600.0}
    values.update(settings)
    return build_runtime(Settings(**values), client=client,
                         tenants=parse_tenants(tenants, env={}), clock=clock or FakeClock(),
                         rilla=FakeRilla())


# -- the transform layer: a tenant, snapshots as the worker stores them, one call's action ----
def tenant(**overrides: Any) -> Tenant:
    """The tenant the transform tests build payloads for (``acme``, one mapped user)."""
    values: dict[str, Any] = {
        "slug": "acme",
        "rilla_api_key": "rk_test_0000000000",
        "default_user_email": "office@acme.example",
        "users": {"mike@acme.example": "mike.r@acme.example"},
    }
    values.update(overrides)
    return Tenant(**values)


def snap(source: str, kind: str, raw: dict[str, Any]) -> Snapshot:
    """``parse_event`` that must give a Snapshot."""
    result = parse_event(source, kind, raw)
    assert isinstance(result, Snapshot), result
    return result


def stored(snapshot: Snapshot, received_at: float) -> dict[str, Any]:
    """What the worker keeps in Redis for one snapshot (a JSON round trip, as there)."""
    item = {"rank": snapshot.rank, "received_at": received_at, "fields": snapshot.fields}
    loaded: dict[str, Any] = json.loads(json.dumps(item))
    return loaded


def action_for(source: str, events: list[tuple[str, dict[str, Any]]], t: Tenant | None = None,
               resolved: Mapping[str, str] | None = None) -> Action:
    """Parse events (received in list order), merge them and build the call's action."""
    snaps = [snap(source, kind, raw) for kind, raw in events]
    assert len({s.call_id for s in snaps}) == 1
    merged = merge_snapshots([stored(s, float(i)) for i, s in enumerate(snaps)])
    return build_action(source, snaps[0].call_id, merged, t or tenant(), resolved or {})


def skip_reason(result: object) -> str:
    """The reason of a Skip (anything else fails the test)."""
    assert isinstance(result, Skip), result
    return result.reason


# -- Sentry -----------------------------------------------------------------------------------
class CapturingTransport(Transport):
    """A Sentry transport that keeps the events it would send (``init_sentry(...,
    transport=...)``); the ``sentry_transport`` fixture resets Sentry afterwards."""

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.events: list[dict[str, Any]] = []

    def capture_envelope(self, envelope: Envelope) -> None:
        for item in envelope.items:
            if item.type in ("event", "transaction") and item.payload.json is not None:
                self.events.append(item.payload.json)

    def flush(self, timeout: float, callback: Any = None) -> None:
        return None

    def kill(self) -> None:
        return None


# -- history records --------------------------------------------------------------------------
class HistoryRecords:
    """History records as ``rilla_bridge.lifecycle`` appends them to the ``rb:history`` stream
    (``rilla_bridge.history.records``), with stream ids that grow with each record and times
    from ``clock``. ``xadd`` puts one on a Redis stream as the lead's scripts do."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.last = (0, 0)

    def next_id(self) -> str:
        ms = int(self.clock.now() * 1000)
        self.last = (ms, self.last[1] + 1) if ms <= self.last[0] else (ms, 0)
        return f"{self.last[0]}-{self.last[1]}"

    def received(self, event_id: str, body: dict[str, Any] | None = None, *,
                 tenant: str = "acme", source: str = "callrail", kind: str = "post_call",
                 call_id: str | None = None, status: str = "queued", kept: bool = True,
                 lane: str = "live") -> Record:
        raw = json.dumps(body if body is not None else load("callrail", "post_call")).encode()
        if call_id is None and body is None:
            call_id = load("callrail", "post_call")["resource_id"]
        data = {"id": event_id, "tenant": tenant, "source": source, "kind": kind,
                "call_id": call_id, "received_at": self.clock.now(), "size": len(raw),
                "sha256": hashlib.sha256(raw).hexdigest(), "status": status, "note": "",
                "lane": lane, "kept": kept}
        return Record(self.next_id(), RECEIVED, data, raw if kept else None)

    def step(self, event_id: str, status: str | None = None, *,
             tl: list[dict[str, Any]] | None = None, **columns: Any) -> Record:
        now = self.clock.now()
        entries = [{"t": now, **e} for e in (tl if tl is not None else [])]
        return Record(self.next_id(), STEP, {"id": event_id, "at": now, "status": status,
                                             "set": columns, "tl": entries})

    def attempt(self, event_id: str, n: int, http_status: int, status: str | None = None,
                **columns: Any) -> Record:
        now = self.clock.now()
        return self.step(event_id, status, tl=[
            {"what": "attempt", "n": n, "op": "upsert", "status": http_status, "ms": 80}],
            attempts=n, last_attempt_at=now, last_status=http_status, **columns)

    def dead(self, event_id: str, *, tenant: str = "acme", source: str = "callrail",
             reason_code: str = "rilla_rejected", reason: str = "User email is not in Rilla",
             status_code: int | None = 422, attempts: int = 1, call_id: str = "CAL1",
             payload: dict[str, Any] | None = None) -> Record:
        now = self.clock.now()
        payload = payload or {"event_id": f"{source}-{call_id}"}
        return Record(self.next_id(), DEAD, {
            "id": event_id, "tenant": tenant, "source": source, "kind": "post_call",
            "call_id": call_id, "rilla_event_id": f"{source}-{call_id}",
            "reason_code": reason_code, "reason": reason, "status_code": status_code,
            "response_body": reason, "attempts": attempts, "first_failure_at": now,
            "failed_at": now, "payload": json.dumps(payload)})

    def handled(self, event_id: str, how: str = "replayed", by: str = "cli") -> Record:
        return Record(self.next_id(), HANDLED, {"id": event_id, "how": how,
                                                "at": self.clock.now(), "by": by})

    def call(self, call_id: str, version: int, state: dict[str, str] | None = None, *,
             tenant: str = "acme", source: str = "callrail") -> Record:
        return Record(self.next_id(), CALL, {
            "tenant": tenant, "source": source, "call_id": call_id, "version": version,
            "state": state if state is not None else {"s:ev_x": "{}", "v": str(version)}})

    def audit(self, action: str = "replay", count: int = 1) -> Record:
        return Record(self.next_id(), AUDIT, {"at": self.clock.now(), "actor": "cli:test",
                                              "action": action, "selection": {"all": True},
                                              "count": count, "detail": ""})

    def delivered_event(self, event_id: str, body: dict[str, Any] | None = None,
                        **received: Any) -> list[Record]:
        """An event's whole ordinary life: received, one attempt (200), delivered."""
        first = self.received(event_id, body, **received)
        self.clock.advance(1)
        return [first, self.attempt(event_id, 1, 200, "delivered", last_payload={"ok": 1})]


def xadd_record(client: redis.Redis, record: Record, stream: str = "rb:history") -> str:
    """Append ``record`` to the history stream as lifecycle does (Redis picks the id)."""
    fields: dict[Any, Any] = {"r": record.type, "d": encode(record.data)}
    if record.body:
        fields["b"] = record.body
    sid = client.xadd(stream, fields)
    return sid.decode() if isinstance(sid, bytes) else str(sid)
