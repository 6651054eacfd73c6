-- Free a delivery's call lock and tenant slot; a freed slot wakes the tenant's longest waiter.
-- KEYS: call lock, tenant in-flight zset, tenant wait zset, tenant wait messages, retry zset,
--       pending zset, queue.
-- ARGV: token, now (s).
--#include lib/wake
if redis.call('HGET', KEYS[1], 'token') == ARGV[1] then redis.call('DEL', KEYS[1]) end
if redis.call('ZREM', KEYS[2], ARGV[1]) == 0 then return 0 end
return wake_one(KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], ARGV[2])
