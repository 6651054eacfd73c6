-- Put a call's state, read back from history, into Redis (unless another worker did first).
-- KEYS: 1 call hash. ARGV: 1 safety ttl s, then field, value pairs (with its version `v`).
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local fields = {}
for i = 2, #ARGV do fields[#fields + 1] = ARGV[i] end
if #fields > 0 then redis.call('HSET', KEYS[1], unpack(fields)) end
redis.call('HSETNX', KEYS[1], 'v', 0)
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
