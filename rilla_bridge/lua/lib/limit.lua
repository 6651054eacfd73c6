-- A tenant's intake limit: two token buckets in one hash, events (rate per second, two
-- seconds of burst) and body bytes (rate per second, a minute of burst). Returns 0 when the
-- webhook may pass (and takes its tokens), else the seconds to wait (for Retry-After).
local function take_intake(key, now_s, per_s, bytes_per_s, size)
  local v = redis.call('HMGET', key, 'e', 'b', 't')
  local ecap, bcap = per_s * 2, bytes_per_s * 60
  local last = tonumber(v[3]) or now_s
  local elapsed = math.max(0, now_s - last)
  local e = math.min(ecap, (tonumber(v[1]) or ecap) + elapsed * per_s)
  local b = math.min(bcap, (tonumber(v[2]) or bcap) + elapsed * bytes_per_s)
  local need = math.min(size, bcap)   -- a body larger than a minute's allowance needs it all
  local wait = 0
  if e < 1 then wait = (1 - e) / per_s end
  if b < need then wait = math.max(wait, (need - b) / bytes_per_s) end
  if wait == 0 then
    e = e - 1
    b = b - need
  end
  redis.call('HSET', key, 'e', tostring(e), 'b', tostring(b), 't', tostring(now_s))
  redis.call('EXPIRE', key, 120)
  if wait == 0 then return 0 end
  return math.max(1, math.ceil(wait))
end
