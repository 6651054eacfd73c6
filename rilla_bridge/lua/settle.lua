-- The end of a worker's run of an event: its history (a `step`, a `dead` record when it was
-- dead-lettered, the call's state when it touched the call), the call's lock and the
-- tenant's slot released, then the tenant's next event dispatched. Either the event is
-- finished (its Redis record goes; history has it) or it waits for a retry.
-- KEYS: 1 event hash, 2 history stream, 3 stats, 4 tenant's open zset, 5 live retry zset,
--       6 bulk retry zset, 7 call hash, 8 call lock, 9.. the dispatch keys.
-- ARGV: 1 event id, 2 now ms, 3 mode (finish|retry), 4 counters to add (JSON: field -> n,
--       see lifecycle.stats_fields), 5 `step` record,
--       6 `dead` record ('' none), 7 lock token ('' none), 8 call record head JSON ('' when
--       the event did not touch a call), 9 fingerprint now delivered ('' none), 10 retry due
--       (s), 11 fields to keep on the event for its next attempt (JSON object of strings),
--       12 the status while it waits, 13 the run's claim token, 14.. the dispatch arguments.
-- A run whose lease lapsed (the event went to another worker, or is finished already) only
-- adds its timeline, without a status: the event, its slot and its lock are not its own, and
-- the history must not say the event ended as this run would have had it.
--#include lib/dispatch
--#include lib/history
local id = ARGV[1]
local T, C = context(9, 14, tonumber(ARGV[2]))
-- (An event no run holds, waiting in its retry set, is settled by whoever asks: a failed
-- recording lookup dead-letters it.)
local holder = redis.call('HGET', KEYS[1], 'claimed_by')
if redis.call('EXISTS', KEYS[1]) == 0 or (holder and holder ~= ARGV[13]) then
  local step = cjson.decode(ARGV[5])
  step['status'] = cjson.null
  step['set'] = {}
  record(KEYS[2], 'step', cjson.encode(step))
  return 0
end
record(KEYS[2], 'step', ARGV[5])
if ARGV[6] ~= '' then record(KEYS[2], 'dead', ARGV[6]) end
if ARGV[9] ~= '' and redis.call('EXISTS', KEYS[7]) == 1 then
  redis.call('HSET', KEYS[7], 'delivered', ARGV[9])
  redis.call('HINCRBY', KEYS[7], 'v', 1)
end
if ARGV[8] ~= '' then record_call(KEYS[2], KEYS[7], ARGV[8]) end
if ARGV[7] ~= '' and redis.call('HGET', KEYS[8], 'token') == ARGV[7] then
  redis.call('DEL', KEYS[8])
end
for field, n in pairs(cjson.decode(ARGV[4])) do
  redis.call('HINCRBYFLOAT', KEYS[3], field, n)
end
redis.call('ZREM', T.inflight, id)
if ARGV[3] == 'finish' then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[4], id)
  redis.call('ZREM', KEYS[5], id)   -- an event settled while it waited (a failed lookup)
  redis.call('ZREM', KEYS[6], id)
elseif redis.call('EXISTS', KEYS[1]) == 1 then
  local keep = cjson.decode(ARGV[11])
  for k, v in pairs(keep) do redis.call('HSET', KEYS[1], k, tostring(v)) end
  redis.call('HSET', KEYS[1], 'status', ARGV[12])
  redis.call('HDEL', KEYS[1], 'claimed_by', 'claim_until')
  if redis.call('HGET', KEYS[1], 'lane') == 'live' then
    redis.call('ZADD', KEYS[5], ARGV[10], id)
  else
    redis.call('ZADD', KEYS[6], ARGV[10], id)
  end
end
dispatch_own(T, C)
return 1
