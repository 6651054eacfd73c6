"""The dead-letter store: events we gave up on, kept (no expiry) until replayed or deleted.

An entry keeps everything SPEC lists: our event id, tenant, source, the raw event, the last
payload sent, Rilla's last status and body, attempts, first and last failure times, and the
reason. Entries are added, and replayed, by ``rilla_bridge.lifecycle`` (an event's status
changes there); this module lists, reads and deletes them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import redis

from rilla_bridge import keys
from rilla_bridge.clock import Clock

LIST_FIELDS = ("id", "tenant", "source", "kind", "event_id", "reason_code", "reason",
               "status_code", "attempts", "first_failure_at", "failed_at")


@dataclass(frozen=True)
class Selector:
    tenant: str | None = None
    source: str | None = None
    reason: str | None = None

    def matches(self, entry: dict[str, Any]) -> bool:
        if self.tenant and entry.get("tenant") != self.tenant:
            return False
        if self.source and entry.get("source") != self.source:
            return False
        if self.reason:
            r = self.reason.lower()
            if r != str(entry.get("reason_code", "")).lower() and r not in str(
                    entry.get("reason", "")).lower():
                return False
        return True


def _decode(raw: Mapping[Any, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in raw.items():
        name = k.decode()
        out[name] = v if name == "body" else v.decode("utf-8", "replace")
    for name in ("status_code", "attempts"):
        if out.get(name, "") != "":
            out[name] = int(out[name])
        else:
            out[name] = None if name == "status_code" else 0
    for name in ("failed_at", "first_failure_at", "received_at"):
        if out.get(name):
            out[name] = float(out[name])
    return out


class DeadLetters:
    def __init__(self, client: redis.Redis, clock: Clock) -> None:
        self.redis = client
        self.clock = clock

    def add(self, pipe: Any, event: dict[str, Any], *, reason_code: str, reason: str,
            rilla_event_id: str = "", status_code: int | None = None, response_body: str = "",
            payload: dict[str, Any] | None = None, attempts: int = 0,
            first_failure_at: float | None = None) -> None:
        """Queue the writes that dead-letter ``event`` on ``pipe`` (caller executes it)."""
        now = self.clock.now()
        eid = event["id"]
        entry: dict[str, Any] = {
            "id": eid, "tenant": event.get("tenant", ""), "source": event.get("source", ""),
            "kind": event.get("kind", ""), "call_id": event.get("call_id", ""),
            "received_at": event.get("received_at", now), "event_id": rilla_event_id,
            "reason_code": reason_code, "reason": reason[:1000],
            "status_code": "" if status_code is None else status_code,
            "response_body": response_body[:2000], "attempts": attempts,
            "first_failure_at": first_failure_at or now, "failed_at": now,
            "payload": json.dumps(payload) if payload is not None else "",
            "body": event.get("body", b""),
        }
        pipe.hset(keys.dead_letter(eid), mapping=entry)
        pipe.zadd(keys.DLQ_INDEX, {eid: now})

    def get(self, event_id: str) -> dict[str, Any] | None:
        raw = self.redis.hgetall(keys.dead_letter(event_id))
        return _decode(raw) if raw else None

    def iter(self, selector: Selector, batch: int = 500) -> Iterator[dict[str, Any]]:
        """Entries oldest failure first; only the listing fields (no bodies)."""
        start = 0
        while True:
            ids = self.redis.zrange(keys.DLQ_INDEX, start, start + batch - 1)
            if not ids:
                return
            with self.redis.pipeline(transaction=False) as pipe:
                for i in ids:
                    pipe.hmget(keys.dead_letter(i.decode() if isinstance(i, bytes) else str(i)),
                               LIST_FIELDS)
                rows = pipe.execute()
            for row in rows:
                if row[0] is None:
                    continue
                entry = _decode(dict(zip((f.encode() for f in LIST_FIELDS), row, strict=True)))
                if selector.matches(entry):
                    yield entry
            start += batch

    def count(self) -> int:
        return int(self.redis.zcard(keys.DLQ_INDEX))

    def delete(self, event_id: str) -> bool:
        with self.redis.pipeline() as pipe:
            pipe.delete(keys.dead_letter(event_id))
            pipe.zrem(keys.DLQ_INDEX, event_id)
            deleted, _ = pipe.execute()
        return bool(deleted)
