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

# At its in-flight cap a tenant's event does not bounce through the retry set: it waits on the
# tenant's wait list (rb:capwait:{tenant}, a zset of event ids by when they began to wait, and
# a hash of their queue messages), and whoever frees a slot wakes the longest-waiting one:
# its message goes to the consuming end of the queue (RPUSH: kombu pops from the right), so it
# runs next. Only an event whose status is still 'waiting' is woken; an entry left by an
# event that went on another way (its safety retry, a dead letter) is dropped when reached.
# _WAIT_LUA writes the waiting state and the wait-list entry in one step and then wakes a
# waiter itself if a slot is free by now, so a release between the cap check and this step
# cannot leave a waiter behind. The retry set keeps a late safety copy
# (CAP_WAIT_SAFETY_SECONDS) for a slot that is never released: a killed worker's lease runs
# out instead.
_WAKE = """
local function wake_one(wait_key, msg_key, retry_key, pending_key, queue_key)
  for _ = 1, 25 do
    local head = redis.call('ZPOPMIN', wait_key)
    local id = head[1]
    if not id then return 0 end
    local msg = redis.call('HGET', msg_key, id)
    redis.call('HDEL', msg_key, id)
    local ek = 'rb:ev:' .. id
    if msg and redis.call('HGET', ek, 'status') == 'waiting' then
      local t = redis.call('TIME')
      local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
      redis.call('ZREM', retry_key, id)
      redis.call('ZADD', pending_key, now, id)
      redis.call('RPUSH', queue_key, msg)
      redis.call('HSET', ek, 'status', 'queued')
      redis.call('RPUSH', ek .. ':tl', cjson.encode({t = math.floor(now * 1000) / 1000,
        what = 'queued', reason = "a slot under the tenant's in-flight cap freed"}))
      return 1
    end
  end
  return 0
end
"""

# The call lock and the tenant slot, taken together (both acquire scripts and the wait).
_SLOTS = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- Drops lapsed leases (a killed worker's); whether the tenant has a slot free.
local function slot_free(inflight, now, max)
  redis.call('ZREMRANGEBYSCORE', inflight, '-inf', now)
  return redis.call('ZCARD', inflight) < tonumber(max)
end
-- 1 taken (the event, when named, leaves the wait list), 0 call busy, -1 tenant at its cap.
local function take(lock, inflight, wait_key, msg_key, token, lease, max, event_id)
  local now = now_ms()
  if not redis.call('SET', lock, token, 'NX', 'PX', lease) then return 0 end
  if not slot_free(inflight, now, max) then
    redis.call('DEL', lock)
    return -1
  end
  redis.call('ZADD', inflight, now + tonumber(lease), token)
  redis.call('PEXPIRE', inflight, lease)
  if event_id ~= '' then
    redis.call('ZREM', wait_key, event_id)
    redis.call('HDEL', msg_key, event_id)
  end
  return 1
end
"""

# KEYS: call lock, tenant in-flight zset, tenant wait zset, tenant wait messages.
# ARGV: token, lease ms, max in flight, event id ('' = none).
# Returns 1 acquired (and the event leaves the wait list), 0 call busy, -1 tenant at its cap.
_ACQUIRE_LUA = _SLOTS + """
return take(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2], ARGV[3], ARGV[4])
"""

# KEYS: call hash, call lock, tenant in-flight zset, tenant wait zset, tenant wait messages.
# ARGV: snapshot field, snapshot JSON, retention s, token, lease ms, max in flight, want lock,
#       event id.
# Stores the event's snapshot and, when asked, takes the call's lock in the same step; when
# the lock is taken the whole call state comes back, read under the lock. One round trip.
_SNAPSHOT_ACQUIRE_LUA = _SLOTS + """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
if ARGV[7] ~= '1' then return {2} end
local got = take(KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[4], ARGV[5], ARGV[6], ARGV[8])
if got ~= 1 then return {got} end
return {1, redis.call('HGETALL', KEYS[1])}
"""

# KEYS: event hash, timeline, stats, tenant in-flight zset, tenant wait zset, tenant wait
#       messages, retry zset, pending zset, queue.
# ARGV: event id, queue message, safety due (s), retention s, timeline entry, stats counter,
#       max in flight.
# The event waits for a slot: status, timeline, safety retry and wait-list entry in one step
# (it keeps its place if it waited before), then a waiter is woken if a slot is free now.
_WAIT_LUA = _SLOTS + _WAKE + """
local now = now_ms()
local since = redis.call('HGET', KEYS[1], 'waiting_since') or tostring(now / 1000)
redis.call('HSET', KEYS[1], 'status', 'waiting', 'next_attempt_at', ARGV[3],
  'waiting_since', since)
redis.call('RPUSH', KEYS[2], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('HINCRBY', KEYS[3], ARGV[6], 1)
redis.call('ZADD', KEYS[7], ARGV[3], ARGV[1])
redis.call('ZREM', KEYS[8], ARGV[1])
redis.call('ZADD', KEYS[5], since, ARGV[1])
redis.call('HSET', KEYS[6], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[5], ARGV[4])
redis.call('EXPIRE', KEYS[6], ARGV[4])
if slot_free(KEYS[4], now, ARGV[7]) then
  return wake_one(KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9])
end
return 0
"""

# KEYS: call lock, tenant in-flight zset, tenant wait zset, tenant wait messages, retry zset,
#       pending zset, queue. ARGV: token.
# Frees the call lock and the tenant slot; a freed slot wakes the tenant's longest waiter.
_RELEASE_LUA = _WAKE + """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
if redis.call('ZREM', KEYS[2], ARGV[1]) == 0 then return 0 end
return wake_one(KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7])
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
        self._wait = client.register_script(_WAIT_LUA)
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
                  token, lease_ms, max_inflight, "1" if want_lock else "0", event_id])
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
        """1 taken (``event_id``, when given, leaves the tenant's wait list), 0 call busy,
        -1 tenant at its cap (see ``wait_for_slot``)."""
        return int(self._acquire(
            keys=[keys.call_lock_key(tenant, source, call_id), keys.inflight_key(tenant),
                  keys.cap_wait_key(tenant), keys.cap_wait_messages_key(tenant)],
            args=[token, lease_ms, max_inflight, event_id]))

    def wait_for_slot(self, tenant: str, event_id: str, *, due: float, entry: str,
                      counter: str, max_inflight: int, retention: int) -> bool:
        """Put the event on its tenant's wait list, status 'waiting', with a safety retry at
        ``due``; returns whether a waiter (maybe this one) was woken at once."""
        return bool(self._wait(
            keys=[keys.event_key(event_id), keys.timeline_key(event_id), keys.STATS,
                  keys.inflight_key(tenant), keys.cap_wait_key(tenant),
                  keys.cap_wait_messages_key(tenant), keys.RETRY, keys.PENDING, QUEUE_EVENTS],
            args=[event_id, process_event_message(event_id), repr(due), retention, entry,
                  counter, max_inflight]))

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
