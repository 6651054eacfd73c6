-- Give a named lease up before it lapses (a scheduler copy that stops): only its own holder
-- may, so another copy takes the job at its next tick instead of after the lease.
-- KEYS: lease hash. ARGV: owner. Returns 1 released, 0 not held by this owner.
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
