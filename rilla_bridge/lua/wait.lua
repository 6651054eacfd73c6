-- The event waits for a slot under its tenant's in-flight cap: status, timeline, safety retry
-- and wait-list entry in one step (it keeps its place if it waited before), then a waiter is
-- woken at once if a slot is free by now, so a release between the cap check and this step
-- cannot leave a waiter behind. The safety retry only covers a slot that is never released.
-- KEYS: event hash, timeline, stats, tenant in-flight zset, tenant wait zset, tenant wait
--       messages, retry zset, pending zset, queue.
-- ARGV: event id, queue message, safety due (s), retention s, timeline entry, stats counter,
--       max in flight, now ms.
--#include lib/slots
--#include lib/wake
local now = tonumber(ARGV[8])
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
  return wake_one(KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], now / 1000)
end
return 0
