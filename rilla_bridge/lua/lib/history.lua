-- Appending history records to the stream the SQL writer drains (rilla_bridge/history/).

local function record(stream, kind, data)
  redis.call('XADD', stream, '*', 'r', kind, 'd', data)
end

-- The call's whole state as a `call` record (head: JSON with tenant, source, call_id).
local function record_call(stream, call_key, head)
  local flat = redis.call('HGETALL', call_key)
  if #flat == 0 then return end
  local state = {}
  for i = 1, #flat, 2 do state[flat[i]] = flat[i + 1] end
  local rec = cjson.decode(head)
  rec['version'] = tonumber(state['v']) or 0
  rec['state'] = state
  record(stream, 'call', cjson.encode(rec))
end
