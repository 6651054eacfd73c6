-- Events whose lease lapsed (the worker holding them died, or their queue message was lost)
-- go back to the head of their tenant's lane, with a line on their timeline.
-- KEYS: 1 history stream, 2.. the dispatch keys. ARGV: 1 now ms, 2 how many ids follow,
--       3.. the ids (read just before; each is checked again here), then the dispatch args.
--#include lib/dispatch
--#include lib/history
local n = tonumber(ARGV[2])
local T, C = context(2, 3 + n, tonumber(ARGV[1]))
local now = tonumber(ARGV[1])
local moved = 0
for i = 3 + n - 1, 3, -1 do
  local id = ARGV[i]
  local score = tonumber(redis.call('ZSCORE', T.inflight, id))
  if score and score <= now then
    redis.call('ZREM', T.inflight, id)
    redis.call('LPUSH', T.lane, id)
    record(KEYS[1], 'step', cjson.encode({id = id, at = now / 1000, status = cjson.null,
      set = {}, tl = {{t = now / 1000, what = 'requeued',
      reason = 'its lease lapsed: the worker holding it stopped'}}}))
    moved = moved + 1
  end
end
if moved > 0 then dispatch_own(T, C) end
return moved
