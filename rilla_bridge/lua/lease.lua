-- A named lease (a scheduler job's turn, a tenant's reconciliation interval): taken when free
-- or lapsed by the caller's clock; Redis's own expiry only collects the key later.
-- KEYS: lease hash. ARGV: owner, now ms, lease ms. Returns 1 taken, 0 held by another.
local held_until = tonumber(redis.call('HGET', KEYS[1], 'until'))
if held_until and held_until > tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'until', tonumber(ARGV[2]) + tonumber(ARGV[3]))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) + 60000)
return 1
