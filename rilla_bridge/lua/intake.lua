-- Store one received body and put it in its tenant's lane, atomically, with its history
-- record; dispatch it at once when the tenant has a slot free. A body seen within the dedup
-- window is not stored again: the answer is the first event's id. The tenant's intake limit
-- is checked first: over it, nothing is stored and the answer is {-1, seconds to wait}.
-- A webhook (lane live) within the limit, a repeat too, stamps its tenant and source in the
-- last-webhook hash (the metric that tells a tenant gone silent).
-- KEYS: 1 dedup, 2 event hash, 3 history stream, 4 tenant's open zset, 5 tenants set,
--       6 tenant's limit hash, 7 last-webhook hash, 8.. the dispatch keys (lib/dispatch.lua).
-- ARGV: 1 event id, 2 dedup ttl s, 3 now ms, 4 received at (s), 5 source, 6 kind, 7 call id,
--       8 body ('' = not kept), 9 '1' to queue it ('0': recorded as finished, e.g. skipped),
--       10 lane (live; anything else, e.g. reconcile or backfill, waits in the bulk lane),
--       11 the `received` record (JSON), 12 limit events/s ('' = no limit), 13 limit
--       bytes/s, 14 body size, 15.. the dispatch arguments.
--#include lib/dispatch
--#include lib/history
--#include lib/limit
if ARGV[12] ~= '' then
  local wait = take_intake(KEYS[6], tonumber(ARGV[4]), tonumber(ARGV[12]), tonumber(ARGV[13]),
    tonumber(ARGV[14]))
  if wait > 0 then return {-1, wait} end
end
if ARGV[10] == 'live' then redis.call('HSET', KEYS[7], ARGV[15] .. '|' .. ARGV[5], ARGV[4]) end
local existing = redis.call('GET', KEYS[1])
if existing then return {0, existing} end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
if ARGV[8] ~= '' then
  redis.call('XADD', KEYS[3], '*', 'r', 'received', 'd', ARGV[11], 'b', ARGV[8])
else
  record(KEYS[3], 'received', ARGV[11])
end
if ARGV[9] ~= '1' then return {1, ARGV[1]} end
local T, C = context(8, 15, tonumber(ARGV[3]))
redis.call('HSET', KEYS[2], 'tenant', T.name, 'source', ARGV[5], 'kind', ARGV[6],
  'call_id', ARGV[7], 'received_at', ARGV[4], 'lane', ARGV[10], 'status', 'queued',
  'body', ARGV[8])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1])
redis.call('SADD', KEYS[5], T.name)
if ARGV[10] == 'live' then
  redis.call('RPUSH', T.lane, ARGV[1])
else
  redis.call('RPUSH', T.bulk, ARGV[1])
end
dispatch_own(T, C)
return {1, ARGV[1]}
