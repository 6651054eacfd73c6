-- An event that waits in its retry set goes back to the head of its lane now (its recording
-- was resolved, or an operator said "retry now").
-- KEYS: 1 event hash, 2 history stream, 3 live retry zset, 4 bulk retry zset,
--       5.. the dispatch keys.
-- ARGV: 1 event id, 2 now ms, 3 `step` record, 4.. the dispatch arguments.
--#include lib/dispatch
--#include lib/history
local T, C = context(5, 4, tonumber(ARGV[2]))
local id = ARGV[1]
if redis.call('ZREM', KEYS[3], id) == 1 then
  redis.call('LPUSH', T.lane, id)
elseif redis.call('ZREM', KEYS[4], id) == 1 then
  redis.call('LPUSH', T.bulk, id)
else
  return 0
end
redis.call('HSET', KEYS[1], 'status', 'queued')
record(KEYS[2], 'step', ARGV[3])
dispatch_own(T, C)
return 1
