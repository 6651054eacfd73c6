-- A worker takes a dispatched event: only a copy whose event is dispatched (in the tenant's
-- in-flight zset) and not held by another live worker proceeds, so stale or duplicate queue
-- messages (restored by kombu, re-dispatched after a lapsed lease) never run it twice at once.
-- The slot's lease becomes the worker's, renewed by its heartbeat (renew.lua).
-- KEYS: 1 event hash, 2 tenant's in-flight zset, 3 queue, 4 ready.
-- ARGV: 1 event id, 2 the run's claim token (worker and run), 3 now ms, 4 lease ms.
-- Returns {code, queue length, tenants ready, fields...}: 0 gone, 1 not dispatched (a stale
-- copy), 2 held by another worker, 3 claimed (with the event's fields).
local qlen = redis.call('LLEN', KEYS[3])
local ready = redis.call('ZCARD', KEYS[4])
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return {0, qlen, ready}
end
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then return {1, qlen, ready} end
local now = tonumber(ARGV[3])
local holder = redis.call('HMGET', KEYS[1], 'claimed_by', 'claim_until')
if holder[1] and holder[1] ~= ARGV[2] and tonumber(holder[2] or 0) > now then
  return {2, qlen, ready}
end
local until_ms = now + tonumber(ARGV[4])
redis.call('HSET', KEYS[1], 'claimed_by', ARGV[2], 'claim_until', until_ms,
  'status', 'in_flight')
redis.call('ZADD', KEYS[2], until_ms, ARGV[1])
return {3, qlen, ready, redis.call('HGETALL', KEYS[1])}
