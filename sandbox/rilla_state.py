"""State and validation rules of the Rilla sandbox (see ``rilla_bridge.sandbox.rilla``).

All mutation goes through ``SandboxState`` methods under one lock. The lock is never
held across a blocking call, so it is safe for threads and for greenlets alike.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

MISSING = "Missing some required parameters in the body"
INVALID_JSON = "Invalid JSON data"
BAD_KEY = "API key is not in Rilla"
RECORDING_TYPES = frozenset({"CALL_AUDIO", "APPOINTMENT_AUDIO", "CALL_AUDIO_WITH_LOCATION"})
INSERT_FIELDS = ("start_time", "end_time", "title")
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


def mask_key(api_key: str) -> str:
    """A recognisable but non-secret form of an API key (last 4 characters at most)."""
    return "****" + api_key[-4:] if len(api_key) >= 12 else "****"


def _text(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _valid_time(value: Any) -> bool:
    if not isinstance(value, str) or len(value) != 19:
        return False
    try:
        datetime.strptime(value, TIME_FORMAT)
    except ValueError:
        return False
    return True


class SandboxError(Exception):
    """A request the sandbox answers with ``status`` and plain-text ``body``."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(status, body)
        self.status = status
        self.body = body


@dataclass
class Fault:
    """Answer ``status`` (after ``latency_ms``) for the next ``remaining`` matching requests."""

    status: int | None
    remaining: int | None
    latency_ms: int = 0
    api_key: str | None = None
    body: str | None = None
    retry_after: str | None = None

    def matches(self, api_key: str | None) -> bool:
        """Whether this fault applies to a request made with ``api_key``."""
        return self.api_key is None or self.api_key == api_key


class SandboxState:
    """Everything the sandbox remembers: orgs, appointments, conversations, log, faults.

    ``orgs`` maps an API key to its users' emails, or to None to accept any user email.
    """

    def __init__(self, orgs: Mapping[str, Iterable[str] | None] | None = None, *,
                 latency_ms: int = 0, log_size: int = 10_000) -> None:
        self.latency_ms = latency_ms
        self.lock = threading.Lock()
        self.orgs: dict[str, frozenset[str] | None] = {
            k: _users(v) for k, v in (orgs or {}).items()}
        self.appointments: dict[str, dict[str, dict[str, Any]]] = {}
        self.meta: dict[tuple[str, str], dict[str, Any]] = {}
        self.conversations: dict[str, dict[str, dict[str, Any]]] = {}
        self.key_latency: dict[str, int] = {}
        self.faults: list[Fault] = []
        self.log: deque[dict[str, Any]] = deque(maxlen=log_size)
        self.requests = 0
        self.started = self.in_progress = 0   # API requests begun / being answered now
        self.by_status: Counter[str] = Counter()
        self.upserts_by_event: Counter[str] = Counter()
        self.deletes = 0

    # -- control ---------------------------------------------------------------------

    def set_org(self, api_key: str, users: Iterable[str] | None) -> None:
        """Create or replace an org; ``users=None`` accepts any user email."""
        with self.lock:
            self.orgs[api_key] = _users(users)

    def add_fault(self, fault: Fault) -> None:
        """Queue a fault; the first matching fault with requests left is used."""
        with self.lock:
            self.faults.append(fault)

    def clear_faults(self) -> None:
        """Remove every fault."""
        with self.lock:
            self.faults.clear()

    def set_latency(self, latency_ms: int, api_key: str | None = None) -> None:
        """Delay every answer (or only answers to ``api_key``) by ``latency_ms``."""
        with self.lock:
            if api_key is None:
                self.latency_ms = latency_ms
            else:
                self.key_latency[api_key] = latency_ms

    def add_conversation(self, api_key: str, conversation_id: str, has_recording: bool,
                         recording_missing: bool = False) -> None:
        """Create (or replace) a conversation in an org, for the match endpoint."""
        with self.lock:
            self.conversations.setdefault(api_key, {})[conversation_id] = {
                "conversation_id": conversation_id, "has_recording": has_recording,
                "recording_missing": recording_missing, "appointment_id": None}

    def reset(self) -> None:
        """Forget appointments, conversations, the request log, counters and faults."""
        with self.lock:
            self.appointments.clear()
            self.meta.clear()
            self.conversations.clear()
            self.faults.clear()
            self.key_latency.clear()
            self.log.clear()
            self.requests = self.deletes = self.started = 0   # in_progress: still running
            self.by_status.clear()
            self.upserts_by_event.clear()

    # -- observation ----------------------------------------------------------------

    def take_fault(self, api_key: str | None) -> tuple[Fault | None, float]:
        """Consume one matching fault (if any) and return it with the delay in seconds."""
        with self.lock:
            delay = self.key_latency.get(api_key or "", self.latency_ms)
            for fault in self.faults:
                if fault.matches(api_key) and (fault.remaining is None or fault.remaining > 0):
                    if fault.remaining is not None:
                        fault.remaining -= 1
                    self.faults = [f for f in self.faults if f.remaining != 0]
                    return fault, (delay + fault.latency_ms) / 1000
            return None, delay / 1000

    def begin(self) -> None:
        """An API request arrived (before any latency or fault): how many run at once is
        what a client's concurrency looks like from Rilla's side."""
        with self.lock:
            self.started += 1
            self.in_progress += 1

    def end(self) -> None:
        with self.lock:
            self.in_progress -= 1

    def record(self, method: str, path: str, status: int, event_id: str | None) -> None:
        """Count and log one answered API request (never the key)."""
        with self.lock:
            self.requests += 1
            self.by_status[str(status)] += 1
            self.log.append({"method": method, "path": path, "status": status,
                             "event_id": event_id, "received_at": time.time()})

    def list_appointments(self, api_key: str | None = None) -> list[dict[str, Any]]:
        """Stored appointments (of one org, or all): the stored fields plus ``org`` (masked
        key) and ``_sandbox`` (created_at, updated_at, upserts)."""
        with self.lock:
            return [{**appt, "org": mask_key(key), "_sandbox": dict(self.meta[(key, eid)])}
                    for key, appts in self.appointments.items()
                    if api_key is None or key == api_key
                    for eid, appt in appts.items()]

    def list_conversations(self, api_key: str | None = None) -> list[dict[str, Any]]:
        """Conversations (of one org, or all), each with its org key masked."""
        with self.lock:
            return [{"org": mask_key(key), **conv}
                    for key, convs in self.conversations.items()
                    if api_key is None or key == api_key
                    for conv in convs.values()]

    def stats(self) -> dict[str, Any]:
        """Request counters; upserts and deletes count successful (200) ones only."""
        with self.lock:
            return {"requests": self.requests, "started": self.started,
                    "in_progress": self.in_progress, "by_status": dict(self.by_status),
                    "upserts_by_event": dict(self.upserts_by_event), "deletes": self.deletes}

    def recent(self, limit: int) -> list[dict[str, Any]]:
        """The last ``limit`` logged requests, oldest first."""
        with self.lock:
            return list(self.log)[-limit:] if limit > 0 else []

    # -- the Custom CRM API ------------------------------------------------------------

    def check_key(self, api_key: str | None) -> str:
        """The key if it belongs to an org, else 422."""
        with self.lock:
            if api_key is None or api_key not in self.orgs:
                raise SandboxError(422, BAD_KEY)
        return api_key

    def upsert(self, api_key: str, body: dict[str, Any]) -> str:
        """Insert or merge an appointment; returns the success message or raises."""
        if not _text(body.get("event_id")) or not _text(body.get("user_email")):
            raise SandboxError(400, MISSING)
        event_id: str = body["event_id"]
        email: str = body["user_email"]
        with self.lock:
            users = self.orgs[api_key]
            appts = self.appointments.setdefault(api_key, {})
            existing = appts.get(event_id)
            if existing is None:
                customer = body.get("customer")
                if (any(not _text(body.get(f)) for f in INSERT_FIELDS)
                        or not isinstance(customer, dict)
                        or not _text(customer.get("id")) or not _text(customer.get("name"))):
                    raise SandboxError(400, MISSING)
            merged = _merge(existing or {}, body)
            _validate(merged, body)
            if users is not None and email.strip().lower() not in users:
                raise SandboxError(422, "User email is not in Rilla")
            now = time.time()
            meta = self.meta.setdefault((api_key, event_id), {"created_at": now, "upserts": 0})
            meta["updated_at"] = now
            meta["upserts"] += 1
            appts[event_id] = merged
            self.upserts_by_event[event_id] += 1
        return f"Successfully {'updated' if existing else 'created'} appointment"

    def delete(self, api_key: str, event_id: str) -> str:
        """Delete an appointment; 404 when the org has none with that id."""
        with self.lock:
            if self.appointments.get(api_key, {}).pop(event_id, None) is None:
                raise SandboxError(404, "Appointment not found")
            self.meta.pop((api_key, event_id), None)
            self.deletes += 1
        return "Successfully deleted appointment"

    def match(self, api_key: str, body: dict[str, Any]) -> str:
        """Link a conversation's recording to an event, exactly as the seed's table says."""
        if not _text(body.get("event_id")) or not _text(body.get("conversation_id")):
            raise SandboxError(400, MISSING)
        event_id: str = body["event_id"]
        conversation_id: str = body["conversation_id"]
        with self.lock:
            if event_id not in self.appointments.get(api_key, {}):
                raise SandboxError(404, "Event not found")
            conv = self.conversations.get(api_key, {}).get(conversation_id)
            if conv is None:
                raise SandboxError(404, "Conversation not found")
            if not conv["has_recording"]:
                raise SandboxError(422, "Conversation has no recording to link")
            if conv["recording_missing"]:
                raise SandboxError(422, "Conversation's recording could not be found to link")
            conv["appointment_id"] = event_id
        return "Successfully matched conversation to event"


def _users(users: Iterable[str] | None) -> frozenset[str] | None:
    if users is None:
        return None
    return frozenset(str(u).strip().lower() for u in users)


def _merge(existing: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    """Top-level fields replace stored ones; ``customer`` is merged field by field."""
    merged = dict(existing)
    for key, value in body.items():
        if key == "customer" and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def _validate(merged: dict[str, Any], body: dict[str, Any]) -> None:
    for name in ("start_time", "end_time"):
        if name in body and not _valid_time(body[name]):
            raise SandboxError(400, f"Invalid {name}: expected yyyy-mm-dd hh:mm:ss (UTC)")
    if "customer" in body and not isinstance(body["customer"], dict):
        raise SandboxError(400, MISSING)
    recording_type = merged.get("recording_type")
    if merged.get("media_url") and recording_type is None:
        raise SandboxError(400, "recording_type is required when media_url is provided")
    if recording_type is not None and recording_type not in RECORDING_TYPES:
        raise SandboxError(400, "Invalid recording_type")
    if recording_type == "CALL_AUDIO_WITH_LOCATION" and not _text(merged.get("location")):
        raise SandboxError(400, "location is required for CALL_AUDIO_WITH_LOCATION")
