-- History holds a call's state at this version: let the Redis copy go, unless it changed
-- since or a delivery of the call holds its lock. The call's bits go into the Bloom filter
-- first, so a later event of the call knows to reload it from history.
-- KEYS: 1 call hash, 2 call lock, 3 seen filter (this generation).
-- ARGV: 1 version written, 2 now ms, 3 filter ttl s, 4.. the call's bit positions.
if tonumber(redis.call('HGET', KEYS[1], 'v')) ~= tonumber(ARGV[1]) then return 0 end
local held_until = tonumber(redis.call('HGET', KEYS[2], 'until'))
if held_until and held_until > tonumber(ARGV[2]) then return 0 end
for i = 4, #ARGV do redis.call('SETBIT', KEYS[3], ARGV[i], 1) end
redis.call('EXPIRE', KEYS[3], ARGV[3])
redis.call('DEL', KEYS[1])
return 1
