-- Cancels a job: a queued one completes as cancelled; a running one gets its cancel flag
-- and its id published on `P cancel` (the worker that holds it tells the app).
-- KEYS (routing only: a Redis Cluster sends the script to their slot; the script names
--   every key from P, and the job hashes it reaches carry the same hash tag):
--   P queue, P deadlines, P running, P completed, P activity, P outbox,
--   P outbox_attempts, P job:<id>
-- ARGV: P, id, cancelled completion, cancelled result, at
-- Returns {'notfound'} | {'done'} already completed | {'running', spec} | {'removed'}
local id = ARGV[2]
local jk = jkey(id)
local f = redis.call('HMGET', jk, 'phase', 'spec')
if not f[1] then return {'notfound'} end
if f[1] == 'c' then return {'done'} end
if f[1] == 'r' then
  redis.call('HSET', jk, 'cancel', 1)
  redis.call('PUBLISH', P .. 'cancel', id)
  redis.call('PUBLISH', P .. 'events', 'cancel')
  return {'running', f[2]}
end
finish(id, ARGV[3], ARGV[4], ARGV[5])
redis.call('PUBLISH', P .. 'events', 'cancel')
return {'removed'}
