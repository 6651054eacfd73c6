"""The event store: every received webhook, its status and its timeline, in Redis.

Intake stores the raw body, our metadata and the queue message in ONE Lua script, so an
event is either stored and queued or not at all, and a repeated identical body within the
dedup window answers with the first event's id instead of being stored twice.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from rilla_bridge import redis_conn as keys
from rilla_bridge.taskqueue import QUEUE_EVENTS, process_event_message

# KEYS: dedup, event hash, pending zset, queue list
# ARGV: event id, queue message ('' = do not enqueue), dedup ttl, retention, received at,
#       tenant, source, kind, status, size, sha256, call id, body ('' = not kept), then
#       optional field pairs.
# Field names live here, not in ARGV, and the usual event is one HSET: the script is most of
# Redis's work per webhook.
_INTAKE_LUA = """
local existing = redis.call('GET', KEYS[1])
if existing then return {0, existing} end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
if ARGV[13] ~= '' then
  redis.call('HSET', KEYS[2], 'id', ARGV[1], 'received_at', ARGV[5], 'tenant', ARGV[6],
    'source', ARGV[7], 'kind', ARGV[8], 'status', ARGV[9], 'size', ARGV[10],
    'sha256', ARGV[11], 'call_id', ARGV[12], 'body', ARGV[13])
else
  redis.call('HSET', KEYS[2], 'id', ARGV[1], 'received_at', ARGV[5], 'tenant', ARGV[6],
    'source', ARGV[7], 'kind', ARGV[8], 'status', ARGV[9], 'size', ARGV[10],
    'sha256', ARGV[11], 'call_id', ARGV[12])
end
if #ARGV > 13 then
  local fields = {}
  for i = 14, #ARGV do fields[#fields + 1] = ARGV[i] end
  redis.call('HSET', KEYS[2], unpack(fields))
end
redis.call('EXPIRE', KEYS[2], ARGV[4])
if ARGV[2] ~= '' then
  redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1])
  redis.call('LPUSH', KEYS[4], ARGV[2])
end
return {1, ARGV[1]}
"""


def new_event_id(now: float | None = None) -> str:
    """Time-ordered, unguessable: ``ev_`` + milliseconds (hex) + 64 random bits."""
    ms = int((time.time() if now is None else now) * 1000)
    return f"ev_{ms:012x}{secrets.token_hex(8)}"


@dataclass(frozen=True)
class Stored:
    event_id: str
    duplicate: bool


class EventStore:
    def __init__(self, client: redis.Redis, *, dedup_window: int, retention: int,
                 intake_client: Callable[[], redis.Redis] | None = None) -> None:
        self.redis = client
        # ``intake`` runs on this client when given (the web process: a connection per
        # thread, see redis_conn.ConnectionPerThread), else on ``client``.
        self._intake_client = intake_client
        self.dedup_window = max(1, dedup_window)
        self.retention = max(60, retention)
        self._intake = client.register_script(_INTAKE_LUA)

    def intake(
        self,
        *,
        source: str,
        tenant: str,
        kind: str,
        body: bytes,
        call_id: str | None,
        keep_body: bool = True,
        enqueue: bool = True,
        status: str = "queued",
        note: str = "",
        extra: dict[str, str] | None = None,
    ) -> Stored:
        """Store one received body durably and queue it; raises redis.RedisError if Redis can't."""
        now = time.time()
        event_id = new_event_id(now)
        digest = hashlib.sha256(body).hexdigest()
        fields: list[Any] = []
        if note:
            fields += ["note", note]
        for k, v in (extra or {}).items():
            fields += [k, v]
        message = process_event_message(event_id) if enqueue else ""
        client = self._intake_client() if self._intake_client else None
        store_keys = [keys.dedup_key(source, tenant, kind, digest), keys.event_key(event_id),
                      keys.PENDING, QUEUE_EVENTS]
        args = [event_id, message, self.dedup_window, self.retention, repr(now), tenant,
                source, kind, status, len(body), digest, call_id or "",
                body if keep_body else "", *fields]
        try:
            code, stored_id = self._intake(client=client, keys=store_keys, args=args)
        except redis.ConnectionError:
            if client is None:
                raise
            # A single connection is not checked before use as a pooled one is, so after a
            # Redis restart the first command meets the closed socket (and redis-py 8 does
            # not retry it). It is disconnected now: one more try connects afresh. Had the
            # first try reached Redis, this one is answered as its duplicate, same id.
            code, stored_id = self._intake(client=client, keys=store_keys, args=args)
        sid = stored_id.decode() if isinstance(stored_id, bytes) else str(stored_id)
        return Stored(event_id=sid, duplicate=not code)

    def get(self, event_id: str) -> dict[str, Any] | None:
        raw = self.redis.hgetall(keys.event_key(event_id))
        return self.decode(raw) if raw else None

    @staticmethod
    def decode(raw: dict[Any, Any]) -> dict[str, Any]:
        """An event hash as read from Redis: text fields decoded, the body left as bytes."""
        out: dict[str, Any] = {}
        for k, v in raw.items():
            name = k.decode()
            out[name] = v if name == "body" else v.decode("utf-8", "replace")
        return out

    def timeline(self, event_id: str) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.redis.lrange(keys.timeline_key(event_id), 0, -1)]


def timeline_entry(what: str, **data: Any) -> str:
    return json.dumps({"t": round(time.time(), 3), "what": what, **data}, separators=(",", ":"))
