-- Taking work from a tenant's lanes onto Celery's queue (see rilla_bridge/lanes.py).
-- A tenant: T = {name, lane, bulk, inflight, cap, weight}. The call's context:
-- C = {ready, paused, queue, bucket, now_ms, qmax, lease_ms, rate, tpl}.
-- An event is dispatched only with a slot free under its tenant's cap: the slot (its entry in
-- the tenant's in-flight zset, under a lease) is taken in the same step as the queue message
-- is written, so work over a tenant's cap stays in Redis and never occupies a worker.

-- The Celery message from the template pieces (text, name, text, ..., text).
local function message(tpl, id, tenant, tid)
  local out = {}
  for i, p in ipairs(tpl) do
    if i % 2 == 1 then out[#out + 1] = p
    elseif p == 'id' then out[#out + 1] = id
    elseif p == 'tenant' then out[#out + 1] = tenant
    else out[#out + 1] = tid end
  end
  return table.concat(out)
end

-- A tenant with waiting work joins the round at its current front (never ahead of it, and
-- without credit for the time it had nothing to do).
local function join(ready, t)
  if redis.call('ZSCORE', ready, t) then return end
  local head = redis.call('ZRANGE', ready, 0, 0, 'WITHSCORES')
  redis.call('ZADD', ready, head[2] or 0, t)
end

-- The bulk pace: a token bucket of `rate` per second with one second of burst (and room for
-- one whole token: a rate under one per second still lets an event go now and then).
local function bulk_token(bucket, now_s, rate)
  if rate <= 0 then return true end
  local v = redis.call('HMGET', bucket, 'tokens', 'ts')
  local ts = tonumber(v[2]) or now_s
  local tokens = math.min(math.max(rate, 1),
                          (tonumber(v[1]) or rate) + math.max(0, now_s - ts) * rate)
  if tokens < 1 then
    redis.call('HSET', bucket, 'tokens', tostring(tokens), 'ts', tostring(now_s))
    return false
  end
  redis.call('HSET', bucket, 'tokens', tostring(tokens - 1), 'ts', tostring(now_s))
  return true
end

local function has_work(T)
  return redis.call('LLEN', T.lane) + redis.call('LLEN', T.bulk) > 0
end

-- Dispatch the tenant's next event: live before bulk, bulk only at the pace. 1 done, 0 not now
-- (a paused or capped tenant leaves the round until resumed or a slot frees; a tenant that
-- waits for queue room or the pace stays in it).
local function dispatch_one(T, C)
  if redis.call('SISMEMBER', C.paused, T.name) == 1 then
    redis.call('ZREM', C.ready, T.name)
    return 0
  end
  if redis.call('ZCOUNT', T.inflight, C.now_ms, '+inf') >= T.cap then
    redis.call('ZREM', C.ready, T.name)
    return 0
  end
  if not has_work(T) then
    redis.call('ZREM', C.ready, T.name)
    return 0
  end
  if redis.call('LLEN', C.queue) >= C.qmax then
    join(C.ready, T.name)
    return 0
  end
  local id = redis.call('LPOP', T.lane)
  if not id then
    if not bulk_token(C.bucket, C.now_ms / 1000, C.rate) then
      join(C.ready, T.name)
      return 0
    end
    id = redis.call('LPOP', T.bulk)
  end
  redis.call('ZADD', T.inflight, C.now_ms + C.lease_ms, id)
  redis.call('LPUSH', C.queue, message(C.tpl, id, T.name, id .. '.' .. C.now_ms))
  if has_work(T) then
    join(C.ready, T.name)
    redis.call('ZINCRBY', C.ready, 1 / T.weight, T.name)
  else
    redis.call('ZREM', C.ready, T.name)
  end
  return 1
end

-- After a step that gave the tenant work or a free slot: dispatch its next event at once
-- while the queue is short; when it is long (workers saturated), the tenant joins the round
-- and the shared refill (dispatch.lua) serves the tenants in turn.
local function dispatch_own(T, C)
  if redis.call('LLEN', C.queue) * 2 < C.qmax then return dispatch_one(T, C) end
  if has_work(T) and redis.call('SISMEMBER', C.paused, T.name) == 0 then
    join(C.ready, T.name)
  end
  return 0
end

-- The tenant and context tables. Every dispatching script ends its KEYS with the seven
-- dispatch keys from KEYS[k]: lane, bulk lane, in-flight zset, ready, paused, queue, bucket;
-- and its ARGV from ARGV[a] with: tenant, cap, weight, queue max, lease ms, bulk rate, then
-- the template pieces to the end (rilla_bridge/lanes.py builds both).
local function context(k, a, now_ms)
  local tpl = {}
  for i = a + 6, #ARGV do tpl[#tpl + 1] = ARGV[i] end
  local T = {name = ARGV[a], lane = KEYS[k], bulk = KEYS[k + 1], inflight = KEYS[k + 2],
             cap = tonumber(ARGV[a + 1]), weight = tonumber(ARGV[a + 2])}
  local C = {ready = KEYS[k + 3], paused = KEYS[k + 4], queue = KEYS[k + 5],
             bucket = KEYS[k + 6], now_ms = now_ms, qmax = tonumber(ARGV[a + 3]),
             lease_ms = tonumber(ARGV[a + 4]), rate = tonumber(ARGV[a + 5]), tpl = tpl}
  return T, C
end
