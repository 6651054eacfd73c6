-- A dead letter back through the pipeline from its raw event (read from history): the event
-- is stored again under its own id and waits in its tenant's bulk lane, dispatched at the
-- bulk pace. Refused while the event is in progress or was replayed within the marker's ttl.
-- KEYS: 1 event hash, 2 history stream, 3 tenant's open zset, 4 tenants set, 5 replay marker,
--       6.. the dispatch keys.
-- ARGV: 1 event id, 2 now ms, 3 source, 4 kind, 5 call id, 6 received at, 7 body,
--       8 `step` record, 9 `handled` record, 10 marker ttl s, 11.. the dispatch arguments.
--#include lib/dispatch
--#include lib/history
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[5]) == 1 then return 0 end
local T, C = context(6, 11, tonumber(ARGV[2]))
redis.call('HSET', KEYS[1], 'tenant', T.name, 'source', ARGV[3], 'kind', ARGV[4],
  'call_id', ARGV[5], 'received_at', ARGV[6], 'lane', 'replay', 'status', 'queued',
  'body', ARGV[7])
redis.call('ZADD', KEYS[3], tonumber(ARGV[2]) / 1000, ARGV[1])
redis.call('SADD', KEYS[4], T.name)
redis.call('SET', KEYS[5], 1, 'EX', ARGV[10])
redis.call('RPUSH', T.bulk, ARGV[1])
record(KEYS[2], 'step', ARGV[8])
record(KEYS[2], 'handled', ARGV[9])
dispatch_own(T, C)
return 1
