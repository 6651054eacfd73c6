-- CallRail quota guard: every decision about one account is ONE call of this script, so
-- concurrent processes can never both spend the last token (see quota.py for the key layout).
-- "Now" is the caller's clock (epoch seconds), so every process judges windows alike within
-- the clocks' agreement, which the margin covers.
--
-- KEYS: 1 pause_until, 2 pause_level, 3 waiting set, 4 known zset,
--       then per lane i (in priority order): queue list, hourly usage hash, daily usage hash.
-- ARGV: 1 op (take|next|status|pause), 2 account, 3 number of lanes, 4 hourly limit,
--       5 daily limit, 6 hour seconds, 7 day seconds, 8 margin seconds, 9 hour bucket seconds,
--       10 day bucket seconds, 11 now, 12.. one share per lane, then the op's own arguments.
--
-- Usage hashes: field "lo" = oldest bucket that may still count, "n" = live total,
-- "<bucket index>" = grants in that bucket. A grant in bucket b counts until
-- (b + 1) * size + window + margin: never earlier than a true rolling window would free it.

local now = tonumber(ARGV[11])
local op, account, n = ARGV[1], ARGV[2], tonumber(ARGV[3])
local HL, DL = tonumber(ARGV[4]), tonumber(ARGV[5])
local HW, DW, M = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local HS, DS = tonumber(ARGV[9]), tonumber(ARGV[10])
local shares = {}
for i = 1, n do shares[i] = tonumber(ARGV[11 + i]) end
local A = 11 + n -- op arguments start at ARGV[A + 1]

local function qkey(i) return KEYS[4 + 3 * (i - 1) + 1] end
local function hkey(i) return KEYS[4 + 3 * (i - 1) + 2] end
local function dkey(i) return KEYS[4 + 3 * (i - 1) + 3] end
local function fmt(b) return string.format('%d', b) end
local function f6(x) return string.format('%.6f', x) end
local function cutoff(window, size) return math.floor((now - window - M) / size) end

-- Drop expired buckets and return how many grants in key still count.
local function live(key, cut)
  local lo = tonumber(redis.call('HGET', key, 'lo'))
  if not lo then return 0 end
  local total = tonumber(redis.call('HGET', key, 'n')) or 0
  if lo >= cut then return total end
  -- The key's TTL bounds this walk to about one window of buckets; the guard is a backstop.
  if cut - lo > 100000 then redis.call('DEL', key) return 0 end
  for b = lo, cut - 1 do
    local c = redis.call('HGET', key, fmt(b))
    if c then
      total = total - tonumber(c)
      redis.call('HDEL', key, fmt(b))
    end
  end
  if total <= 0 then redis.call('DEL', key) return 0 end
  redis.call('HSET', key, 'lo', fmt(cut), 'n', total)
  return total
end

-- A caller's "now" may be a bucket behind the key's "lo" (processes read their clocks, then
-- reach Redis in any order); its grant counts in bucket "lo", freed a little later than its
-- own bucket would be, never earlier. Below "lo" no walk would ever subtract it.
local function add(key, size, window)
  local b = math.floor(now / size)
  local lo = tonumber(redis.call('HGET', key, 'lo'))
  if not lo then
    redis.call('HSET', key, 'lo', fmt(b))
  elseif b < lo then
    b = lo
  end
  redis.call('HINCRBY', key, fmt(b), 1)
  redis.call('HINCRBY', key, 'n', 1)
  redis.call('PEXPIRE', key, math.ceil((window + M + 2 * size) * 1000))
end

-- Seconds until fewer than cap grants across keys are live; 0 if already so, nil if never.
local function free_in(keys, total, cap, cut, size, window)
  if total < cap then return 0 end
  if cap <= 0 then return nil end
  local lo = nil
  for _, k in ipairs(keys) do
    local l = tonumber(redis.call('HGET', k, 'lo'))
    if l and (not lo or l < lo) then lo = l end
  end
  if not lo then return 0 end
  local freed = 0
  for b = math.max(lo, cut), math.floor(now / size) do
    for _, k in ipairs(keys) do
      local c = tonumber(redis.call('HGET', k, fmt(b)))
      if c then freed = freed + c end
    end
    if total - freed < cap then return (b + 1) * size + window + M - now end
  end
  return nil
end

local paused_until = tonumber(redis.call('GET', KEYS[1]))
if paused_until and paused_until <= now then paused_until = nil end

if op == 'pause' then
  local base, max, jitter = tonumber(ARGV[A + 1]), tonumber(ARGV[A + 2]), tonumber(ARGV[A + 3])
  local level = tonumber(redis.call('GET', KEYS[2])) or 0
  -- 429s answered while a pause is on belong to the same episode (requests already in
  -- flight): escalating on each would multiply the pause by the number of workers.
  if paused_until then return {f6(paused_until - now), level, 0} end
  level = redis.call('INCR', KEYS[2])
  redis.call('PEXPIRE', KEYS[2], math.ceil((max + DW) * 1000))
  local secs = math.min(max, math.min(max, base * 2 ^ (level - 1)) * jitter)
  redis.call('SET', KEYS[1], f6(now + secs), 'PX', math.max(1, math.ceil(secs * 1000)))
  redis.call('ZADD', KEYS[4], now, account)
  return {f6(secs), level, 1}
end

local hcut, dcut = cutoff(HW, HS), cutoff(DW, DS)
local hu, du, htot, dtot = {}, {}, 0, 0
for i = 1, n do
  hu[i] = live(hkey(i), hcut)
  du[i] = live(dkey(i), dcut)
  htot = htot + hu[i]
  dtot = dtot + du[i]
end

if op == 'take' then
  local out = {f6(now)}
  if paused_until then return out end
  local max_jobs, granted = tonumber(ARGV[A + 1]), 0
  while granted < max_jobs do
    local got = false
    for i = 1, n do
      if htot < HL and dtot < DL and hu[i] < shares[i] * HL and du[i] < shares[i] * DL then
        local job = redis.call('LPOP', qkey(i))
        if job then
          add(hkey(i), HS, HW)
          add(dkey(i), DS, DW)
          hu[i], du[i], htot, dtot = hu[i] + 1, du[i] + 1, htot + 1, dtot + 1
          table.insert(out, tostring(i))
          table.insert(out, job)
          granted, got = granted + 1, true
          break
        end
      end
    end
    if not got then break end
  end
  local waiting = false
  for i = 1, n do
    if redis.call('LLEN', qkey(i)) > 0 then waiting = true break end
  end
  if not waiting then redis.call('SREM', KEYS[3], account) end
  if granted > 0 then
    redis.call('ZADD', KEYS[4], now, account)
    redis.call('PEXPIRE', KEYS[4], math.ceil((DW + M) * 1000))
  end
  return out
end

if op == 'next' then
  local best, any = nil, false
  local hkeys, dkeys = {}, {}
  for i = 1, n do hkeys[i] = hkey(i) dkeys[i] = dkey(i) end
  for i = 1, n do
    if redis.call('LLEN', qkey(i)) > 0 then
      any = true
      local waits = {
        free_in(hkeys, htot, HL, hcut, HS, HW), free_in(dkeys, dtot, DL, dcut, DS, DW),
        free_in({hkeys[i]}, hu[i], shares[i] * HL, hcut, HS, HW),
        free_in({dkeys[i]}, du[i], shares[i] * DL, dcut, DS, DW),
      }
      local w, never = 0, false
      for j = 1, 4 do
        if waits[j] == nil then never = true elseif waits[j] > w then w = waits[j] end
      end
      if not never and (best == nil or w < best) then best = w end
    end
  end
  if not any then return false end
  -- Work waits in a lane whose share is zero: nothing will ever free it; poll hourly.
  if best == nil then best = HW end
  if paused_until and paused_until - now > best then best = paused_until - now end
  return f6(best)
end

if op == 'status' then
  local out = {f6(now), paused_until and f6(paused_until) or '',
               tonumber(redis.call('GET', KEYS[2])) or 0}
  for i = 1, n do
    table.insert(out, hu[i])
    table.insert(out, du[i])
    table.insert(out, redis.call('LLEN', qkey(i)))
  end
  return out
end

return redis.error_reply('unknown op ' .. tostring(op))
