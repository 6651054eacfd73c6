-- Put one dead letter back through intake's path (event record, pending index, queue
-- message) in one step, so a replay is never half done and replaying twice is a no-op the
-- second time (the entry is gone).
-- KEYS: dlq entry, dlq index, event hash, timeline, pending, queue
-- ARGV: id, message, now, retention, timeline entry
local e = redis.call('HGETALL', KEYS[1])
if #e == 0 then return 0 end
local d = {}
for i = 1, #e, 2 do d[e[i]] = e[i + 1] end
redis.call('DEL', KEYS[3])
redis.call('HSET', KEYS[3], 'id', ARGV[1], 'tenant', d['tenant'], 'source', d['source'],
  'kind', d['kind'], 'received_at', d['received_at'] or ARGV[3], 'call_id', d['call_id'] or '',
  'body', d['body'] or '', 'status', 'queued', 'replayed_at', ARGV[3], 'attempts', 0)
redis.call('EXPIRE', KEYS[3], ARGV[4])
redis.call('RPUSH', KEYS[4], ARGV[5])
redis.call('EXPIRE', KEYS[4], ARGV[4])
redis.call('ZADD', KEYS[5], ARGV[3], ARGV[1])
redis.call('LPUSH', KEYS[6], ARGV[2])
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
