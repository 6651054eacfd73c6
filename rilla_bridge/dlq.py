"""The dead-letter store: events we gave up on, kept (no expiry) until replayed or deleted.

An entry keeps everything SPEC lists: our event id, tenant, source, the raw event, the last
payload sent, Rilla's last status and body, attempts, first and last failure times, and the
reason. Replay puts the raw event back through intake's path (event record, pending index,
queue message) in ONE Lua script, so a replay is never half done and replaying twice is a
no-op the second time (the entry is gone).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import redis

from rilla_bridge import redis_conn as keys
from rilla_bridge.events import timeline_entry
from rilla_bridge.taskqueue import QUEUE_EVENTS, process_event_message

LIST_FIELDS = ("id", "tenant", "source", "kind", "event_id", "reason_code", "reason",
               "status_code", "attempts", "first_failure_at", "failed_at")

# KEYS: dlq entry, dlq index, event hash, timeline, pending, queue
# ARGV: id, message, now, retention, timeline entry
_REPLAY_LUA = """
local e = redis.call('HGETALL', KEYS[1])
if #e == 0 then return 0 end
local d = {}
for i = 1, #e, 2 do d[e[i]] = e[i + 1] end
redis.call('DEL', KEYS[3])
redis.call('HSET', KEYS[3], 'id', ARGV[1], 'tenant', d['tenant'], 'source', d['source'],
  'kind', d['kind'], 'received_at', d['received_at'] or ARGV[3], 'call_id', d['call_id'] or '',
  'body', d['body'] or '', 'status', 'queued', 'replayed_at', ARGV[3], 'attempts', 0)
redis.call('EXPIRE', KEYS[3], ARGV[4])
redis.call('RPUSH', KEYS[4], ARGV[5])
redis.call('EXPIRE', KEYS[4], ARGV[4])
redis.call('ZADD', KEYS[5], ARGV[3], ARGV[1])
redis.call('LPUSH', KEYS[6], ARGV[2])
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""


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
    def __init__(self, client: redis.Redis, *, retention: int) -> None:
        self.redis = client
        self.retention = retention
        self._replay = client.register_script(_REPLAY_LUA)

    def add(self, pipe: Any, event: dict[str, Any], *, reason_code: str, reason: str,
            rilla_event_id: str = "", status_code: int | None = None, response_body: str = "",
            payload: dict[str, Any] | None = None, attempts: int = 0,
            first_failure_at: float | None = None) -> None:
        """Queue the writes that dead-letter ``event`` on ``pipe`` (caller executes it)."""
        now = time.time()
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
        pipe.hset(keys.dlq_key(eid), mapping=entry)
        pipe.zadd(keys.DLQ_INDEX, {eid: now})

    def get(self, event_id: str) -> dict[str, Any] | None:
        raw = self.redis.hgetall(keys.dlq_key(event_id))
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
                    pipe.hmget(keys.dlq_key(i.decode() if isinstance(i, bytes) else str(i)),
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

    def replay(self, event_id: str) -> bool:
        """Put one dead letter back through the pipeline from its raw event."""
        now = time.time()
        return bool(self._replay(
            keys=[keys.dlq_key(event_id), keys.DLQ_INDEX, keys.event_key(event_id),
                  keys.timeline_key(event_id), keys.PENDING, QUEUE_EVENTS],
            args=[event_id, process_event_message(event_id), repr(now), self.retention,
                  timeline_entry("replayed")],
        ))

    def delete(self, event_id: str) -> bool:
        with self.redis.pipeline() as pipe:
            pipe.delete(keys.dlq_key(event_id))
            pipe.zrem(keys.DLQ_INDEX, event_id)
            deleted, _ = pipe.execute()
        return bool(deleted)
