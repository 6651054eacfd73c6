"""History records: what Redis hands to the SQL history, one stream entry each.

Every step of an event's life (``rilla_bridge.lifecycle``) appends records to the Redis stream
``keys.HISTORY`` in the same Lua script or MULTI block that changes the event in Redis, so the
history can never miss a step and delivery never waits on the database. The ``history``
process (``workers/history.py``) reads the stream with a consumer group, writes each batch in
one SQL transaction (idempotently: a batch read twice writes nothing twice), then acks and
deletes the entries.

A stream entry has the fields ``r`` (record type), ``d`` (JSON object) and, for ``received``
records of kept bodies, ``b`` (the raw body bytes). Types and their ``d``:

``received``  a webhook (or a call found by reconciliation/backfill) was stored:
              ``id, tenant, source, kind, call_id, received_at, size, sha256, status, note,
              lane, kept`` (``kept`` false: lead events, whose bodies are never stored).
``step``      the event changed: ``id, at, status`` (the new status, or null when unchanged),
              ``set`` (column values: attempts, first_attempt_at, last_attempt_at, last_status,
              next_attempt_at, reason, last_payload, finished_at), ``tl`` (timeline entries,
              each ``{"t": time, "what": ..., ...}``; attempts are ``what = "attempt"`` with
              ``n, op, status, body, ms``).
``dead``      the event was dead-lettered: ``id, tenant, source, kind, call_id, rilla_event_id,
              reason_code, reason, status_code, response_body, attempts, first_failure_at,
              failed_at, payload``. Keyed by the stream entry id: an event dead-lettered again
              after a replay is a new dead letter.
``call``      a call's merged state in Redis at ``version``: ``tenant, source, call_id,
              version, state`` (``state``: the call hash's fields: ``s:<event id>`` snapshot
              JSON, ``r:<api url>`` resolved recording, ``delivered`` fingerprint). Newer
              versions replace older ones. Once written, the Redis copy may be dropped
              (``CallState.forget``): a later event reloads it from history.
``handled``   a dead letter was handled: ``id, how`` (``replayed`` | ``deleted``), ``at``,
              ``by``.
``audit``     an operator action: ``at, actor, action, selection, count, detail``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

RECEIVED = "received"
STEP = "step"
DEAD = "dead"
CALL = "call"
HANDLED = "handled"
AUDIT = "audit"
TYPES = frozenset({RECEIVED, STEP, DEAD, CALL, HANDLED, AUDIT})


def encode(data: Mapping[str, Any]) -> str:
    """The ``d`` field of an entry (compact JSON)."""
    return json.dumps(data, separators=(",", ":"), default=str)


@dataclass(frozen=True)
class Record:
    """One stream entry as the history writer sees it."""

    stream_id: str          # the entry id ("1700000000000-0"): orders records, keys idempotency
    type: str
    data: dict[str, Any]
    body: bytes | None = None

    @classmethod
    def from_entry(cls, stream_id: Any, fields: Mapping[Any, Any]) -> Record:
        sid = stream_id.decode() if isinstance(stream_id, bytes) else str(stream_id)
        f = {(k.decode() if isinstance(k, bytes) else str(k)): v for k, v in fields.items()}
        kind = f.get("r", b"")
        kind = kind.decode() if isinstance(kind, bytes) else str(kind)
        raw = f.get("d", b"{}")
        data = json.loads(raw) if raw else {}
        body = f.get("b")
        if isinstance(body, str):
            body = body.encode("utf-8", "surrogateescape")
        return cls(stream_id=sid, type=kind, data=data if isinstance(data, dict) else {},
                   body=body if body else None)


def seq(stream_id: str) -> tuple[int, int]:
    """A stream id as a sortable pair (milliseconds, sequence)."""
    ms, _, n = stream_id.partition("-")
    return int(ms), int(n or 0)
