-- The shared refill: while the queue has room, dispatch the next event of the ready tenant
-- whose turn it is (lowest pass in `ready`; each dispatch moves a tenant's pass on by
-- 1 / weight), so a tenant with 50,000 waiting events and one with one are served alike.
-- KEYS: 1 ready, 2 paused, 3 queue, 4 bucket, then per candidate: lane, bulk, in-flight.
-- ARGV: 1 now ms, 2 queue max, 3 lease ms, 4 bulk rate, 5 candidates n, then per candidate:
--       tenant, cap, weight; then the template pieces.
--#include lib/dispatch
local n = tonumber(ARGV[5])
local tpl = {}
for i = 6 + 3 * n, #ARGV do tpl[#tpl + 1] = ARGV[i] end
local C = {ready = KEYS[1], paused = KEYS[2], queue = KEYS[3], bucket = KEYS[4],
           now_ms = tonumber(ARGV[1]), qmax = tonumber(ARGV[2]), lease_ms = tonumber(ARGV[3]),
           rate = tonumber(ARGV[4]), tpl = tpl}
local tenants, active = {}, {}
for i = 0, n - 1 do
  tenants[i + 1] = {name = ARGV[6 + 3 * i], cap = tonumber(ARGV[7 + 3 * i]),
                    weight = tonumber(ARGV[8 + 3 * i]), lane = KEYS[5 + 3 * i],
                    bulk = KEYS[6 + 3 * i], inflight = KEYS[7 + 3 * i]}
  active[i + 1] = true
end
local sent = 0
while redis.call('LLEN', C.queue) < C.qmax do
  local best, best_score = nil, nil
  for i, T in ipairs(tenants) do
    if active[i] then
      local score = tonumber(redis.call('ZSCORE', C.ready, T.name))
      if not score then
        active[i] = false
      elseif not best_score or score < best_score then
        best, best_score = i, score
      end
    end
  end
  if not best then break end
  if dispatch_one(tenants[best], C) == 1 then sent = sent + 1 else active[best] = false end
end
return sent
