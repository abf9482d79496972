-- The webhook outbox entries due at `now`, claimed for `lease_ms` (their next attempt
-- moves on, so another delivery loop does not send them meanwhile); entries whose job
-- is gone are dropped.
-- KEYS (routing only: a Redis Cluster sends the script to their slot; the script names
--   every key from P, and the job hashes it reaches carry the same hash tag):
--   P outbox, P outbox_attempts
-- ARGV: P, now, limit, lease_ms
-- Returns flat [id, url, owner, attempts, next_attempt_ms]...
local due = redis.call('ZRANGEBYSCORE', P .. 'outbox', '-inf', ARGV[2], 'WITHSCORES', 'LIMIT', 0, ARGV[3])
local next_at = string.format('%.0f', tonumber(ARGV[2]) + tonumber(ARGV[4]))
local out = {}
for i = 1, #due, 2 do
  local id = due[i]
  local f = redis.call('HMGET', jkey(id), 'webhook', 'owner')
  if not f[1] then
    redis.call('ZREM', P .. 'outbox', id)
    redis.call('HDEL', P .. 'outbox_attempts', id)
  else
    redis.call('ZADD', P .. 'outbox', next_at, id)
    local a = redis.call('HGET', P .. 'outbox_attempts', id) or '0'
    table.insert(out, id)
    table.insert(out, f[1])
    table.insert(out, f[2] or '')
    table.insert(out, a)
    table.insert(out, due[i + 1])
  end
end
return out
