"""Writing history records (``records.py``) into SQL: one batch, one transaction.

Idempotent: every row a record writes is keyed by the record's stream id (timeline entries by
``(record, idx)``, dead letters and audit entries by ``id``), event rows change only when a
value changes, and a call's state only moves to a newer ``version``; applying a batch twice
writes nothing twice.

Order-safe: batches may be applied out of order (several history processes, or a batch claimed
from a consumer that died after newer ones were written). Each event row keeps the stream id
of the newest record applied to it (``last_record``). A record newer than that sets the status
and the columns it carries; an older one only fills columns that are still empty, so an
event's status never goes back. A step that arrives before its ``received`` record creates the
event row, and ``received`` fills in the rest later. A dead letter closed by a ``handled``
record stays closed even when the ``dead`` record is applied after it (the ``handled`` mark
is kept in the event's timeline).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy.engine import Connection

from rilla_bridge.history import records as rec
from rilla_bridge.history.batch import HANDLED_WHAT, Applied, Batch, CallWritten
from rilla_bridge.history.records import Record, seq
from rilla_bridge.history.search import searchable
from rilla_bridge.tenants import Tenant

__all__ = ["FINISHED", "HANDLED_WHAT", "Applied", "CallWritten", "apply"]

# The finished statuses (rilla_bridge.lifecycle's TERMINAL; a test keeps the two equal).
FINISHED = frozenset({"delivered", "skipped", "dead"})

_FLOATS = frozenset({"received_at", "first_attempt_at", "last_attempt_at", "next_attempt_at",
                     "finished_at"})
_INTS = frozenset({"attempts", "last_status", "size"})
_RECEIVED_COLUMNS = ("tenant", "source", "kind", "call_id", "received_at", "size", "sha256",
                     "note", "lane")
_STEP_COLUMNS = ("attempts", "first_attempt_at", "last_attempt_at", "last_status",
                 "next_attempt_at", "reason", "last_payload", "finished_at")


def apply(conn: Connection, records: Sequence[Record], tenants: Mapping[str, Tenant]
          ) -> Applied:
    """Write one batch on ``conn``, inside the caller's transaction (``db.writing``)."""
    batch = Batch(conn, tenants)
    batch.load({str(r.data.get("id")) for r in records
                if r.type in (rec.RECEIVED, rec.STEP, rec.HANDLED) and r.data.get("id")})
    for r in sorted(records, key=lambda r: seq(r.stream_id)):
        if not _handle(batch, r):
            batch.applied.ignored.append(r.stream_id)
    batch.write()
    batch.applied.records = len(records)
    return batch.applied


# -- values -----------------------------------------------------------------------------------
def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value) if isinstance(
        value, dict | list) else str(value)
    return text if text != "" else None


def _number(kind: type[float] | type[int], value: Any) -> Any:
    if value is None or value == "" or isinstance(value, bool):
        return None
    try:
        return kind(float(value)) if kind is int else float(value)
    except (TypeError, ValueError):
        return None


def _coerce(column: str, value: Any) -> Any:
    if column in _FLOATS:
        return _number(float, value)
    if column in _INTS:
        return _number(int, value)
    return _text(value)


def _record_time(r: Record) -> float:
    return seq(r.stream_id)[0] / 1000.0


# -- one handler per record type (True: understood) ----------------------------------------
def _received(batch: Batch, r: Record, event_id: str) -> bool:
    d = r.data
    row = batch.event(event_id)
    newer = batch.newer(row, r)
    values = {c: _coerce(c, d.get(c)) for c in _RECEIVED_COLUMNS}
    values["received_at"] = values["received_at"] or _record_time(r)
    body = r.body if d.get("kept", True) is not False else None
    tenant = batch.tenants.get(values["tenant"] or "")
    values["customer_phone"], values["customer_name"], values["rep_email"] = searchable(
        values["source"] or "", values["kind"] or "", body, tenant)
    status = _text(d.get("status"))
    if status in FINISHED:
        values["finished_at"] = values["received_at"] or _record_time(r)
    for column, value in values.items():
        batch.set(row, column, value, newer)
    batch.set(row, "status", status, newer)
    if body and event_id not in batch.has_body:
        batch.bodies[event_id] = body
    if newer:
        row["last_record"] = r.stream_id
    return True


def _step(batch: Batch, r: Record, event_id: str) -> bool:
    d = r.data
    row = batch.event(event_id)
    newer = batch.newer(row, r)
    at = _number(float, d.get("at")) or _record_time(r)
    raw_set = d.get("set")
    sets: dict[str, Any] = raw_set if isinstance(raw_set, dict) else {}
    for column in _STEP_COLUMNS:
        if column in sets:
            batch.set(row, column, _coerce(column, sets[column]), newer)
    status = _text(d.get("status"))
    if status is not None:   # null: the step changed no status (a lapsed run, a lapsed lease)
        batch.set(row, "status", status, newer)
    if newer and status and "finished_at" not in sets:
        # finished now, or running again (a replayed dead letter is not finished history)
        row["finished_at"] = at if status in FINISHED else None
    if newer:
        row["last_record"] = r.stream_id
    raw_tl = d.get("tl")
    entries: list[Any] = raw_tl if isinstance(raw_tl, list) else []
    for idx, entry in enumerate(e for e in entries if isinstance(e, dict)):
        batch.timeline.append({
            "record": r.stream_id, "idx": idx, "event_id": event_id,
            "t": _number(float, entry.get("t")) or at, "what": str(entry.get("what") or "?"),
            "data": {k: v for k, v in entry.items() if k not in ("t", "what")}})
    return True


def _dead(batch: Batch, r: Record, event_id: str) -> bool:
    d = r.data
    batch.dead.append({
        "id": r.stream_id, "event_id": event_id, "tenant": _text(d.get("tenant")) or "",
        "source": _text(d.get("source")) or "", "kind": _text(d.get("kind")),
        "call_id": _text(d.get("call_id")), "rilla_event_id": _text(d.get("rilla_event_id")),
        "reason_code": _text(d.get("reason_code")) or "unknown",
        "reason": _text(d.get("reason")) or "", "status_code": _number(int, d.get("status_code")),
        "response_body": _text(d.get("response_body")),
        "attempts": _number(int, d.get("attempts")) or 0,
        "first_failure_at": _number(float, d.get("first_failure_at")),
        "failed_at": _number(float, d.get("failed_at")) or _record_time(r),
        "payload": _text(d.get("payload")),
        "handled_at": None, "handled_how": None, "handled_by": None})
    return True


def _handled(batch: Batch, r: Record, event_id: str) -> bool:
    d = r.data
    batch.event(event_id)   # the timeline entry needs the event row (normally there already)
    at = _number(float, d.get("at")) or _record_time(r)
    how, by = _text(d.get("how")), _text(d.get("by"))
    batch.handled.append((event_id, r.stream_id, at, how, by))
    batch.timeline.append({"record": r.stream_id, "idx": 0, "event_id": event_id, "t": at,
                           "what": HANDLED_WHAT, "data": {"how": how, "by": by}})
    return True


def _call(batch: Batch, r: Record) -> bool:
    d = r.data
    key = (_text(d.get("tenant")), _text(d.get("source")), _text(d.get("call_id")))
    version = _number(int, d.get("version"))
    if not all(key) or version is None or not isinstance(d.get("state"), dict):
        return False
    k = (str(key[0]), str(key[1]), str(key[2]))
    if k not in batch.calls or batch.calls[k][0] < version:
        batch.calls[k] = (version, d["state"], _record_time(r))
    return True


def _audit(batch: Batch, r: Record) -> bool:
    d = r.data
    batch.audit.append({
        "id": r.stream_id, "at": _number(float, d.get("at")) or _record_time(r),
        "actor": _text(d.get("actor")) or "unknown", "action": _text(d.get("action")) or "?",
        "selection": d.get("selection"), "count": _number(int, d.get("count")),
        "detail": _text(d.get("detail"))})
    return True


# Records about one event (they carry its id) and the others.
_EVENT_HANDLERS = {rec.RECEIVED: _received, rec.STEP: _step, rec.DEAD: _dead,
                   rec.HANDLED: _handled}
_OTHER_HANDLERS = {rec.CALL: _call, rec.AUDIT: _audit}


def _handle(batch: Batch, r: Record) -> bool:
    """Apply one record; False when it is not understood (an unknown type, no event id)."""
    on_event = _EVENT_HANDLERS.get(r.type)
    if on_event is not None:
        event_id = _text(r.data.get("id"))
        return bool(event_id) and on_event(batch, r, str(event_id))
    other = _OTHER_HANDLERS.get(r.type)
    return other is not None and other(batch, r)

