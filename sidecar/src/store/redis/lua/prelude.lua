-- Helpers every store script shares: prepended to each script's source (scripts.rs),
-- so ARGV[1] is the function's key prefix in all of them.
-- P: the key prefix `fal:{NAMESPACE/NAME}:` (ARGV[1]).
-- jkey(id): the key of a job's hash.
-- rtime(): Redis' own clock in ms (replicas with skewed clocks agree on leases).
-- enqueue(id, jk): puts a job in the queue (score prio * 2^50 + seq) and, when it has a
--   start deadline, in the deadlines index.
-- finish(id, completion, result, at): completes a queued or running job with the given
--   completion and result, and queues its webhook in the outbox; false when the job was
--   not queued or running.
local P = ARGV[1]
local function jkey(id) return P .. 'job:' .. id end
local function rtime()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function enqueue(id, jk)
  local f = redis.call('HMGET', jk, 'prio', 'seq', 'deadline')
  local score = string.format('%.0f', tonumber(f[1]) * 1125899906842624 + tonumber(f[2]))
  redis.call('ZADD', P .. 'queue', score, id)
  if f[3] and f[3] ~= '' then redis.call('ZADD', P .. 'deadlines', f[3], id) end
end
local function finish(id, completion, result, at)
  local jk = jkey(id)
  local ph = redis.call('HGET', jk, 'phase')
  if ph == 'q' then
    redis.call('ZREM', P .. 'queue', id)
    redis.call('ZREM', P .. 'deadlines', id)
  elseif ph == 'r' then
    redis.call('ZREM', P .. 'running', id)
  else
    return false
  end
  redis.call('HSET', jk, 'phase', 'c', 'completion', completion, 'result', result)
  redis.call('HDEL', jk, 'body')
  redis.call('ZADD', P .. 'completed', at, id)
  redis.call('SET', P .. 'activity', at)
  if redis.call('HEXISTS', jk, 'webhook') == 1 then
    redis.call('ZADD', P .. 'outbox', 0, id)
    redis.call('HSET', P .. 'outbox_attempts', id, 0)
  end
  return true
end
