-- Writes the result of a running job whose fencing token matches.
-- KEYS (routing only: a Redis Cluster sends the script to their slot; the script names
--   every key from P, and the job hashes it reaches carry the same hash tag):
--   P queue, P deadlines, P running, P completed, P activity, P outbox,
--   P outbox_attempts, P job:<id>
-- ARGV: P, id, token, completion, result, at
-- Returns 1 completed | 0 not running, or another token
local f = redis.call('HMGET', jkey(ARGV[2]), 'phase', 'token')
if f[1] ~= 'r' or f[2] ~= ARGV[3] then return 0 end
finish(ARGV[2], ARGV[4], ARGV[5], ARGV[6])
redis.call('PUBLISH', P .. 'events', 'complete')
return 1
