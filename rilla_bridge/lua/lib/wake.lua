-- Queue a tenant's longest-waiting event when a slot under its in-flight cap frees.
-- An entry is on the wait list only while its event waits for a slot: whatever else moves the
-- event on takes it off (a slot taken by another copy of the event: take(); its safety retry:
-- requeue.lua), so the head of the list is always a waiter. Its message goes to the consuming
-- end of the queue (RPUSH: kombu pops from the right), so it runs next.
local function wake_one(wait_key, msg_key, retry_key, pending_key, queue_key, now_s)
  for _ = 1, 25 do
    local head = redis.call('ZPOPMIN', wait_key)
    local id = head[1]
    if not id then return 0 end
    local msg = redis.call('HGET', msg_key, id)
    redis.call('HDEL', msg_key, id)
    if msg then
      redis.call('ZREM', retry_key, id)
      redis.call('ZADD', pending_key, now_s, id)
      redis.call('RPUSH', queue_key, msg)
      return 1
    end
  end
  return 0
end
