-- Load figures for the autoscaler and metrics; drops expired sync-call reports.
-- KEYS (routing only: a Redis Cluster sends the script to their slot; the script names
--   every key from P, and the job hashes it reaches carry the same hash tag):
--   P queue, P running, P activity, P sync
-- ARGV: P
-- Returns {queued, in_flight, oldest submit ms or -1, last activity or -1, sync calls}
local q = redis.call('ZCARD', P .. 'queue')
local r = redis.call('ZCARD', P .. 'running')
local oldest = -1
local ranges = {{'-inf', '(1125899906842624'}, {'1125899906842624', '+inf'}}
for _, range in ipairs(ranges) do
  local top = redis.call('ZRANGEBYSCORE', P .. 'queue', range[1], range[2], 'LIMIT', 0, 1)
  if #top > 0 then
    local s = tonumber(redis.call('HGET', jkey(top[1]), 'submitted'))
    if s and (oldest < 0 or s < oldest) then oldest = s end
  end
end
local act = tonumber(redis.call('GET', P .. 'activity') or '-1')
-- Sync calls gateways hold or have in flight: gateway id -> "count:expiry ms".
local sync = 0
local now = rtime()
local entries = redis.call('HGETALL', P .. 'sync')
for i = 1, #entries, 2 do
  local c, exp = string.match(entries[i + 1], '^(%d+):(%d+)$')
  if c and tonumber(exp) >= now then
    sync = sync + tonumber(c)
  else
    redis.call('HDEL', P .. 'sync', entries[i])
  end
end
return {q, r, oldest, act, sync}
