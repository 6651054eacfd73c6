-- The call lock and the tenant slot, taken together (snapshot_acquire and wait use them).
-- A call lock is a hash {token, until}; a tenant's slots are a zset token -> lease end. Both
-- are judged against the caller's clock (ARGV), so a lapsed lease (a killed worker's) is free
-- again whatever Redis's own expiry says; that expiry only collects the garbage, later.
local GC_SLACK_MS = 60000

-- Drops lapsed leases (a killed worker's); whether the tenant has a slot free.
local function slot_free(inflight, now, max)
  redis.call('ZREMRANGEBYSCORE', inflight, '-inf', now)
  return redis.call('ZCARD', inflight) < tonumber(max)
end

-- 1 taken (the event, when named, leaves the wait list), 0 call busy, -1 tenant at its cap.
local function take(lock, inflight, wait_key, msg_key, token, now, lease, max, event_id)
  local held_until = tonumber(redis.call('HGET', lock, 'until'))
  if held_until and held_until > now then return 0 end
  if not slot_free(inflight, now, max) then return -1 end
  redis.call('HSET', lock, 'token', token, 'until', now + lease)
  redis.call('PEXPIRE', lock, lease + GC_SLACK_MS)
  redis.call('ZADD', inflight, now + lease, token)
  redis.call('PEXPIRE', inflight, lease + GC_SLACK_MS)
  if event_id ~= '' then
    redis.call('ZREM', wait_key, event_id)
    redis.call('HDEL', msg_key, event_id)
  end
  return 1
end
