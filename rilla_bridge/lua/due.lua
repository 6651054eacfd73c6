-- Retries whose time has come go back to the head of their tenant's lanes (they are older
-- than what waits there), and the tenant's next event is dispatched.
-- KEYS: 1 live retry zset, 2 bulk retry zset, 3.. the dispatch keys.
-- ARGV: 1 now (s), 2 now ms, 3 most to move, 4.. the dispatch arguments.
--#include lib/dispatch
local T, C = context(3, 4, tonumber(ARGV[2]))
local moved = 0
for i, lane in ipairs({T.lane, T.bulk}) do
  local ids = redis.call('ZRANGEBYSCORE', KEYS[i], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
  for j = #ids, 1, -1 do
    redis.call('ZREM', KEYS[i], ids[j])
    redis.call('LPUSH', lane, ids[j])
  end
  moved = moved + #ids
end
if moved > 0 then dispatch_own(T, C) end
return moved
