"""Redis-side steps of delivery: per-call state, the per-call lock, retries and re-queueing.

Each multi-key step is one Lua script or one MULTI pipeline, so several workers and several
schedulers can run the same step at once and an event is still queued exactly once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import redis

from rilla_bridge import redis_conn as keys
from rilla_bridge.taskqueue import QUEUE_EVENTS, process_event_message

# At its in-flight cap a tenant's event is not bounced through the retry set over and over:
# the step that finds the cap full also puts it on the tenant's wait list (a zset of event
# ids by when they began to wait, beside a hash of their queue messages), and whoever frees
# a slot queues the longest-waiting one (_RELEASE_LUA). The retry set keeps a late safety
# copy (CAP_WAIT_SAFETY_SECONDS) for a slot that is never released (a killed worker's lease
# runs out instead). Being one step with the cap check, no release can slip in between.
_CAP_WAIT = """
local function wait_for_slot(now, wait_key, msg_key, event_id, message, retention)
  if event_id == '' then return end
  redis.call('ZADD', wait_key, 'NX', now, event_id)
  redis.call('HSET', msg_key, event_id, message)
  redis.call('EXPIRE', wait_key, retention)
  redis.call('EXPIRE', msg_key, retention)
end
"""

# KEYS: call lock, tenant in-flight zset, tenant wait zset, tenant wait messages.
# ARGV: token, lease ms, max in flight, event id ('' = do not wait), queue message, retention.
# Returns 1 acquired, 0 call busy, -1 tenant at its in-flight cap (and the event waits).
_ACQUIRE_LUA = _CAP_WAIT + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[3]) then
  redis.call('DEL', KEYS[1])
  wait_for_slot(now, KEYS[3], KEYS[4], ARGV[4], ARGV[5], ARGV[6])
  return -1
end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""

# KEYS: call hash, call lock, tenant in-flight zset, tenant wait zset, tenant wait messages.
# ARGV: snapshot field, snapshot JSON, retention s, token, lease ms, max in flight, want lock,
#       event id, queue message.
# Stores the event's snapshot and, when asked, takes the call's lock in the same step; when
# the lock is taken the whole call state comes back, read under the lock. One round trip.
_SNAPSHOT_ACQUIRE_LUA = _CAP_WAIT + """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
if ARGV[7] ~= '1' then return {2} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if not redis.call('SET', KEYS[2], ARGV[4], 'NX', 'PX', ARGV[5]) then return {0} end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[6]) then
  redis.call('DEL', KEYS[2])
  wait_for_slot(now, KEYS[4], KEYS[5], ARGV[8], ARGV[9], ARGV[3])
  return {-1}
end
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[5]), ARGV[4])
redis.call('PEXPIRE', KEYS[3], ARGV[5])
return {1, redis.call('HGETALL', KEYS[1])}
"""

# KEYS: call lock, tenant in-flight zset, tenant wait zset, tenant wait messages, retry zset,
#       pending zset, queue. ARGV: token.
# Frees the call lock and the tenant slot; a freed slot goes to the longest-waiting event of
# the tenant that is still unfinished (entries for events finished meanwhile are dropped).
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
if redis.call('ZREM', KEYS[2], ARGV[1]) == 0 then return 0 end
for _ = 1, 25 do
  local head = redis.call('ZPOPMIN', KEYS[3])
  local id = head[1]
  if not id then return 0 end
  local msg = redis.call('HGET', KEYS[4], id)
  redis.call('HDEL', KEYS[4], id)
  local ek = 'rb:ev:' .. id
  local st = redis.call('HGET', ek, 'status')
  if msg and st and st ~= 'delivered' and st ~= 'skipped' and st ~= 'dead' then
    local t = redis.call('TIME')
    redis.call('ZREM', KEYS[5], id)
    redis.call('ZADD', KEYS[6], tonumber(t[1]) + tonumber(t[2]) / 1e6, id)
    redis.call('LPUSH', KEYS[7], msg)
    redis.call('HSET', ek, 'status', 'queued')
    return 1
  end
end
return 0
"""

# KEYS: source zset (retry or pending), pending zset, queue. ARGV: now, max score, id, msg, ...
# Moves each id whose score is still <= max score; ZREM/ZSCORE make it once-only. An event
# already finished (delivered/skipped/dead) is only dropped from both sets, never re-queued.
_REQUEUE_LUA = """
local moved = 0
for i = 3, #ARGV, 2 do
  local id = ARGV[i]
  local score = redis.call('ZSCORE', KEYS[1], id)
  local ek = 'rb:ev:' .. id
  local st = redis.call('HGET', ek, 'status')
  if score and (st == 'delivered' or st == 'skipped' or st == 'dead') then
    -- Finished meanwhile (e.g. by another copy): nothing to queue, nothing pending.
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZREM', KEYS[2], id)
  elseif score and tonumber(score) <= tonumber(ARGV[2]) then
    if KEYS[1] ~= KEYS[2] then redis.call('ZREM', KEYS[1], id) end
    redis.call('ZADD', KEYS[2], ARGV[1], id)
    redis.call('LPUSH', KEYS[3], ARGV[i + 1])
    if st then redis.call('HSET', ek, 'status', 'queued') end
    moved = moved + 1
  end
end
return moved
"""


class CallState:
    """Per-call merged state and the lock that serialises deliveries of one call."""

    def __init__(self, client: redis.Redis, retention: int) -> None:
        self.redis = client
        self.retention = retention
        self._acquire = client.register_script(_ACQUIRE_LUA)
        self._snapshot_acquire = client.register_script(_SNAPSHOT_ACQUIRE_LUA)
        self._release = client.register_script(_RELEASE_LUA)
        self._requeue = client.register_script(_REQUEUE_LUA)

    def snapshot_and_acquire(self, tenant: str, source: str, call_id: str, event_id: str,
                             snapshot: dict[str, Any], *, token: str, lease_ms: int,
                             max_inflight: int, want_lock: bool
                             ) -> tuple[int, dict[str, Any] | None]:
        """Store the snapshot; with ``want_lock``, also try the lock (1 taken, 0 call busy,
        -1 tenant at its cap; 2 = not asked). The call state is returned only when taken."""
        reply = self._snapshot_acquire(
            keys=[keys.call_key(tenant, source, call_id),
                  keys.call_lock_key(tenant, source, call_id), keys.inflight_key(tenant),
                  keys.cap_wait_key(tenant), keys.cap_wait_messages_key(tenant)],
            args=[f"s:{event_id}", json.dumps(snapshot, separators=(",", ":")), self.retention,
                  token, lease_ms, max_inflight, "1" if want_lock else "0", event_id,
                  process_event_message(event_id) if want_lock else ""])
        code = int(reply[0])
        if code != 1:
            return code, None
        flat = reply[1]
        return code, decode_call_state(dict(zip(flat[::2], flat[1::2], strict=True)))

    def get(self, tenant: str, source: str, call_id: str) -> dict[str, Any]:
        return decode_call_state(self.redis.hgetall(keys.call_key(tenant, source, call_id)))

    def set_resolved(self, tenant: str, source: str, call_id: str, api_url: str,
                     media_url: str) -> None:
        key = keys.call_key(tenant, source, call_id)
        with self.redis.pipeline() as pipe:
            pipe.hset(key, f"r:{api_url}", media_url)
            pipe.expire(key, self.retention)
            pipe.execute()

    def acquire(self, tenant: str, source: str, call_id: str, token: str, lease_ms: int,
                max_inflight: int, event_id: str = "") -> int:
        """1 taken, 0 call busy, -1 tenant at its cap: then ``event_id`` (when given) waits
        on the tenant's wait list for a freed slot."""
        return int(self._acquire(
            keys=[keys.call_lock_key(tenant, source, call_id), keys.inflight_key(tenant),
                  keys.cap_wait_key(tenant), keys.cap_wait_messages_key(tenant)],
            args=[token, lease_ms, max_inflight, event_id,
                  process_event_message(event_id) if event_id else "", self.retention]))

    def release(self, pipe: Any, tenant: str, source: str, call_id: str, token: str) -> None:
        """Free the call lock and the tenant slot, handing the slot to a waiting event."""
        self._release(keys=[keys.call_lock_key(tenant, source, call_id),
                            keys.inflight_key(tenant), keys.cap_wait_key(tenant),
                            keys.cap_wait_messages_key(tenant), keys.RETRY, keys.PENDING,
                            QUEUE_EVENTS], args=[token], client=pipe)

    def requeue_due(self, source_key: str, max_score: float, limit: int = 500) -> int:
        """Queue events from ``source_key`` (retry or pending zset) scored <= ``max_score``."""
        ids = self.redis.zrangebyscore(source_key, "-inf", max_score, start=0, num=limit)
        if not ids:
            return 0
        args: list[Any] = [repr(time.time()), repr(max_score)]
        for raw in ids:
            eid = raw.decode() if isinstance(raw, bytes) else str(raw)
            args += [eid, process_event_message(eid)]
        return int(self._requeue(keys=[source_key, keys.PENDING, QUEUE_EVENTS], args=args))


def decode_call_state(raw: Mapping[Any, Any]) -> dict[str, Any]:
    snapshots: list[dict[str, Any]] = []
    resolved: dict[str, str] = {}
    out: dict[str, Any] = {"snapshots": snapshots, "resolved": resolved, "delivered": None}
    for k, v in raw.items():
        name = k.decode()
        if name.startswith("s:"):
            snapshots.append(json.loads(v))
        elif name.startswith("r:"):
            resolved[name[2:]] = v.decode()
        elif name == "delivered":
            out["delivered"] = v.decode()
    return out
