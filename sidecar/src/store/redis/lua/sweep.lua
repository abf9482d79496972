-- Housekeeping: completes queued jobs whose start deadline passed, queues again running
-- jobs whose lease expired (Redis' clock), and purges completed jobs past retention
-- (with their logs and Idempotency-Key) whose webhook is not pending; `batch` of each
-- at most.
-- KEYS (routing only: a Redis Cluster sends the script to their slot; the script names
--   every key from P, and the job hashes it reaches carry the same hash tag):
--   P queue, P deadlines, P running, P completed, P activity, P outbox,
--   P outbox_attempts
-- ARGV: P, now, retention cutoff, timeout completion, timeout result, at, batch
-- Returns {start timeouts, leases expired, purged, next due}: next due is when a sweep or
-- a webhook delivery would next find work (the caller's clock, ms; -1 none): the first
-- start deadline, lease end (Redis' clock, shifted), end of retention, outbox entry.
local batch = tonumber(ARGV[7])
local st, le, pu = 0, 0, 0
local due = redis.call('ZRANGEBYSCORE', P .. 'deadlines', '-inf', ARGV[2], 'LIMIT', 0, batch)
for _, id in ipairs(due) do
  if finish(id, ARGV[4], ARGV[5], ARGV[6]) then
    st = st + 1
  else
    redis.call('ZREM', P .. 'deadlines', id)
  end
end
local rnow = rtime()
local expired = redis.call('ZRANGEBYSCORE', P .. 'running', '-inf', '(' .. string.format('%.0f', rnow), 'LIMIT', 0, batch)
for _, id in ipairs(expired) do
  local jk = jkey(id)
  redis.call('ZREM', P .. 'running', id)
  if redis.call('HGET', jk, 'phase') == 'r' then
    redis.call('HSET', jk, 'phase', 'q', 'lease', 0)
    redis.call('DEL', P .. 'logs:' .. id)
    enqueue(id, jk)
    le = le + 1
  end
end
-- Results past retention; those whose webhook is still pending stay (and are skipped,
-- so they do not block the ones behind them).
local skipped, scanned = 0, 0
while scanned < batch * 4 do
  local old = redis.call('ZRANGEBYSCORE', P .. 'completed', '-inf', '(' .. ARGV[3], 'LIMIT', skipped, batch)
  for _, id in ipairs(old) do
    scanned = scanned + 1
    if redis.call('ZSCORE', P .. 'outbox', id) then
      skipped = skipped + 1
    else
      local h = redis.call('HGET', jkey(id), 'idem')
      if h then
        local v = redis.call('GET', P .. 'idem:' .. h)
        if v and string.match(v, '^%x+ (%S+) ') == id then redis.call('DEL', P .. 'idem:' .. h) end
      end
      redis.call('DEL', jkey(id), P .. 'logs:' .. id)
      redis.call('ZREM', P .. 'completed', id)
      redis.call('HDEL', P .. 'outbox_attempts', id)
      pu = pu + 1
    end
  end
  if #old < batch then break end
end
if st + le + pu > 0 then redis.call('PUBLISH', P .. 'events', 'sweep') end
local now = tonumber(ARGV[2])
local next_due = -1
local function earliest(key, shift)
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if first[2] then
    local t = math.max(tonumber(first[2]) + shift, 0)
    if next_due < 0 or t < next_due then next_due = t end
  end
end
earliest(P .. 'deadlines', 0)
earliest(P .. 'running', now - rnow)
earliest(P .. 'completed', now - tonumber(ARGV[3]))
earliest(P .. 'outbox', 0)
return {st, le, pu, math.floor(next_due)}
