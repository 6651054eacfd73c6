-- Store an event's snapshot in its call's state and, when asked, take the call's lock in the
-- same step; when taken, the whole call state comes back, read under the lock.
-- A call whose state was handed to history and let go (its bits are set in the Bloom filter
-- of such calls) is not started afresh: the caller reloads it from history first (code 3),
-- so a late event never loses what earlier events said.
-- KEYS: 1 call hash, 2 call lock, 3 seen filter (this generation), 4 seen (last generation).
-- ARGV: 1 snapshot field, 2 snapshot JSON, 3 lock token, 4 now ms, 5 lease ms, 6 want lock,
--       7 '1' to check the filter, 8 safety ttl s, 9.. the call's bit positions.
-- Returns {1, state} locked, {0} call busy, {2} stored (no lock asked), {3} reload first.
if ARGV[7] == '1' and #ARGV > 8 and redis.call('EXISTS', KEYS[1]) == 0 then
  local function all_set(key)
    for i = 9, #ARGV do
      if redis.call('GETBIT', key, ARGV[i]) == 0 then return false end
    end
    return true
  end
  if all_set(KEYS[3]) or all_set(KEYS[4]) then return {3} end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HINCRBY', KEYS[1], 'v', 1)
redis.call('EXPIRE', KEYS[1], ARGV[8])
if ARGV[6] ~= '1' then return {2} end
local now = tonumber(ARGV[4])
local held_until = tonumber(redis.call('HGET', KEYS[2], 'until'))
if held_until and held_until > now then return {0} end
redis.call('HSET', KEYS[2], 'token', ARGV[3], 'until', now + tonumber(ARGV[5]))
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[5]) + 60000)
return {1, redis.call('HGETALL', KEYS[1])}
