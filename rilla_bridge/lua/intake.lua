-- Store one received body and queue it, atomically: an event is either stored and queued or
-- not at all; a body seen within the dedup window answers with the first event's id.
-- KEYS: dedup, event hash, pending zset, queue list
-- ARGV: event id, queue message ('' = do not enqueue), dedup ttl, retention, received at,
--       tenant, source, kind, status, size, sha256, call id, body ('' = not kept), then
--       optional field pairs.
-- Field names live here, not in ARGV, and the usual event is one HSET: this script is most of
-- Redis's work per webhook.
local existing = redis.call('GET', KEYS[1])
if existing then return {0, existing} end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
if ARGV[13] ~= '' then
  redis.call('HSET', KEYS[2], 'id', ARGV[1], 'received_at', ARGV[5], 'tenant', ARGV[6],
    'source', ARGV[7], 'kind', ARGV[8], 'status', ARGV[9], 'size', ARGV[10],
    'sha256', ARGV[11], 'call_id', ARGV[12], 'body', ARGV[13])
else
  redis.call('HSET', KEYS[2], 'id', ARGV[1], 'received_at', ARGV[5], 'tenant', ARGV[6],
    'source', ARGV[7], 'kind', ARGV[8], 'status', ARGV[9], 'size', ARGV[10],
    'sha256', ARGV[11], 'call_id', ARGV[12])
end
if #ARGV > 13 then
  local fields = {}
  for i = 14, #ARGV do fields[#fields + 1] = ARGV[i] end
  redis.call('HSET', KEYS[2], unpack(fields))
end
redis.call('EXPIRE', KEYS[2], ARGV[4])
if ARGV[2] ~= '' then
  redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1])
  redis.call('LPUSH', KEYS[4], ARGV[2])
end
return {1, ARGV[1]}
