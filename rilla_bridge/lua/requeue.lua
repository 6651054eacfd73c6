-- Queue again the events of a retry or pending zset whose score is still <= max score;
-- ZSCORE makes each move once-only, however many schedulers run it. An event already finished
-- (delivered/skipped/dead) is only dropped from both sets, never queued again. A queued event
-- leaves its tenant's wait list (its safety retry fired before a slot freed).
-- KEYS: source zset (retry or pending), pending zset, queue, then per event: event hash,
--       its tenant's wait zset, its tenant's wait messages.
-- ARGV: now, max score, then per event: id, queue message.
local moved = 0
for i = 3, #ARGV, 2 do
  local id = ARGV[i]
  local k = 3 + 3 * ((i - 3) / 2)
  local ek, wait_key, msg_key = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  local score = redis.call('ZSCORE', KEYS[1], id)
  local st = redis.call('HGET', ek, 'status')
  if score and (st == 'delivered' or st == 'skipped' or st == 'dead') then
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZREM', KEYS[2], id)
  elseif score and tonumber(score) <= tonumber(ARGV[2]) then
    if KEYS[1] ~= KEYS[2] then redis.call('ZREM', KEYS[1], id) end
    redis.call('ZADD', KEYS[2], ARGV[1], id)
    redis.call('LPUSH', KEYS[3], ARGV[i + 1])
    redis.call('ZREM', wait_key, id)
    redis.call('HDEL', msg_key, id)
    if st then redis.call('HSET', ek, 'status', 'queued') end
    moved = moved + 1
  end
end
return moved
