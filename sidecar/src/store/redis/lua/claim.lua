-- Takes the next runnable job: a new fencing token and a lease on Redis' clock. Jobs at
-- the head whose start deadline passed or whose attempts are exhausted are completed on
-- the way (at most `batch` of them a call).
-- KEYS (routing only: a Redis Cluster sends the script to their slot; the script names
--   every key from P, and the job hashes it reaches carry the same hash tag):
--   P queue, P deadlines, P running, P completed, P outbox, P outbox_attempts, P token,
--   P activity
-- ARGV: P, max_attempts, lease_ms, timeout completion, timeout result, lost completion,
--   lost result, at, batch, worker (the lost ones carry 4294967295 where the attempt
--   count goes: replaced here)
-- Returns {ended, id, spec, seq, attempts, token, lease, started, cancel, body} claimed
--   | {ended} nothing to claim
local now = rtime()
local max = tonumber(ARGV[2])
local batch = tonumber(ARGV[9])
local ended = 0
while ended < batch do
  local top = redis.call('ZRANGE', P .. 'queue', 0, 0)
  if #top == 0 then break end
  local id = top[1]
  local jk = jkey(id)
  local f = redis.call('HMGET', jk, 'phase', 'attempts', 'deadline')
  if f[1] ~= 'q' then
    redis.call('ZREM', P .. 'queue', id)
    redis.call('ZREM', P .. 'deadlines', id)
  else
    local attempts = tonumber(f[2])
    local deadline = nil
    if f[3] and f[3] ~= '' then deadline = tonumber(f[3]) end
    if deadline and now >= deadline then
      finish(id, ARGV[4], ARGV[5], ARGV[8])
      ended = ended + 1
    elseif attempts >= max then
      local n = tostring(attempts)
      local c = string.gsub(ARGV[6], '4294967295', n)
      local r = string.gsub(ARGV[7], '4294967295', n)
      finish(id, c, r, ARGV[8])
      ended = ended + 1
    else
      local tok = redis.call('INCR', P .. 'token')
      local lease_until = now + tonumber(ARGV[3])
      redis.call('ZREM', P .. 'queue', id)
      redis.call('ZREM', P .. 'deadlines', id)
      redis.call('HSET', jk, 'phase', 'r', 'attempts', attempts + 1, 'token', tok,
        'lease', lease_until, 'started', now, 'worker', ARGV[10])
      redis.call('DEL', P .. 'logs:' .. id)
      redis.call('ZADD', P .. 'running', lease_until, id)
      redis.call('SET', P .. 'activity', now)
      redis.call('PUBLISH', P .. 'events', 'claim')
      if ended > 0 then redis.call('PUBLISH', P .. 'events', 'end') end
      local r = redis.call('HMGET', jk, 'spec', 'seq', 'cancel', 'body')
      return {ended, id, r[1], r[2], attempts + 1, tok, lease_until, now, r[3], r[4] or ''}
    end
  end
end
if ended > 0 then redis.call('PUBLISH', P .. 'events', 'end') end
return {ended}
