-- A worker that stops (SIGTERM, its shutdown deadline; a delivery cut off at its time limit)
-- hands an event it still runs back to the head of its tenant's lane at once, instead of
-- leaving it to lapse: slot and call lock freed, dispatched again in the same step.
-- The run's later settle (if it still gets that far) is refused: the event is not its own.
-- KEYS: 1 event hash, 2 history stream, 3 call lock (any key if none), 4.. the dispatch keys.
-- ARGV: 1 event id, 2 now ms, 3 the run's claim token, 4 lock token ('' none), 5 `step`
--       record, 6.. the dispatch arguments. Returns 1 handed back, 0 not this run's.
--#include lib/dispatch
--#include lib/history
local T, C = context(4, 6, tonumber(ARGV[2]))
local id = ARGV[1]
if redis.call('HGET', KEYS[1], 'claimed_by') ~= ARGV[3] then return 0 end
if not redis.call('ZSCORE', T.inflight, id) then return 0 end
if ARGV[4] ~= '' and redis.call('HGET', KEYS[3], 'token') == ARGV[4] then
  redis.call('DEL', KEYS[3])
end
redis.call('ZREM', T.inflight, id)
if redis.call('HGET', KEYS[1], 'lane') == 'live' then
  redis.call('LPUSH', T.lane, id)
else
  redis.call('LPUSH', T.bulk, id)   -- replays, reconciliation, backfill: behind live calls
end
-- Nobody holds it now (a lapsed claim), and the stopping run can no longer settle it.
redis.call('HSET', KEYS[1], 'claimed_by', 'handed-back', 'claim_until', 0, 'status', 'queued')
record(KEYS[2], 'step', ARGV[5])
dispatch_own(T, C)
return 1
