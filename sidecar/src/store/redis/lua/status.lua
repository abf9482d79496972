-- A job's fields, queue rank and log lines in one round trip (atomic, and routable in a
-- cluster, unlike MULTI).
-- KEYS (routing only: a Redis Cluster sends the script to their slot; the script names
--   every key from P, and the job hashes it reaches carry the same hash tag):
--   P queue, P job:<id>, P logs:<id>
-- ARGV: P, id
-- Returns {{spec, seq, phase, attempts, token, lease, started, cancel, completion},
--   queue rank or -1, log lines}
local id = ARGV[2]
local f = redis.call('HMGET', jkey(id), 'spec', 'seq', 'phase', 'attempts', 'token', 'lease',
  'started', 'cancel', 'completion')
local rank = redis.call('ZRANK', P .. 'queue', id)
local logs = redis.call('LRANGE', P .. 'logs:' .. id, 0, -1)
return {f, rank or -1, logs}
