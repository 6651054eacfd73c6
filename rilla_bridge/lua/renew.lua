-- A worker's heartbeat: renew the leases of the events it holds (their slots) and of the call
-- locks it holds, so they lapse within a lease of the worker's death and not before.
-- KEYS: per event: event hash, its tenant's in-flight zset, its call lock (any key if none).
-- ARGV: 1 now ms, 2 lease ms, then per event: event id, the run's claim token, lock token
--       ('' none).
local until_ms = tonumber(ARGV[1]) + tonumber(ARGV[2])
local renewed = 0
for i = 0, (#KEYS / 3) - 1 do
  local ek, inflight, lock = KEYS[3 * i + 1], KEYS[3 * i + 2], KEYS[3 * i + 3]
  local id, run, token = ARGV[3 + 3 * i], ARGV[4 + 3 * i], ARGV[5 + 3 * i]
  if redis.call('HGET', ek, 'claimed_by') == run then
    redis.call('HSET', ek, 'claim_until', until_ms)
    redis.call('ZADD', inflight, 'XX', until_ms, id)
    renewed = renewed + 1
  end
  if token ~= '' and redis.call('HGET', lock, 'token') == token then
    redis.call('HSET', lock, 'until', until_ms)
    redis.call('PEXPIRE', lock, tonumber(ARGV[2]) + 60000)
  end
end
return renewed
