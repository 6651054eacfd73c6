-- Store an event's snapshot in its call's state and, when asked, take the call's lock and a
-- tenant slot in the same step; when taken, the whole call state comes back, read under the
-- lock. One round trip per delivery.
-- KEYS: call hash, call lock, tenant in-flight zset, tenant wait zset, tenant wait messages.
-- ARGV: snapshot field, snapshot JSON, retention s, token, lease ms, max in flight, want lock,
--       event id, now ms.
--#include lib/slots
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
if ARGV[7] ~= '1' then return {2} end
local got = take(KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[4], tonumber(ARGV[9]),
  tonumber(ARGV[5]), ARGV[6], ARGV[8])
if got ~= 1 then return {got} end
return {1, redis.call('HGETALL', KEYS[1])}
