-- Records a webhook delivery attempt: the next attempt and the attempts made so far, or
-- (next = '') removes the entry (delivered or given up).
-- KEYS (routing only: a Redis Cluster sends the script to their slot; the script names
--   every key from P, and the job hashes it reaches carry the same hash tag):
--   P outbox, P outbox_attempts
-- ARGV: P, id, attempts, next ('' = remove)
-- Returns 1
local id = ARGV[2]
if ARGV[4] == '' then
  redis.call('ZREM', P .. 'outbox', id)
  redis.call('HDEL', P .. 'outbox_attempts', id)
  return 1
end
if redis.call('ZSCORE', P .. 'outbox', id) then
  redis.call('ZADD', P .. 'outbox', ARGV[4], id)
  redis.call('HSET', P .. 'outbox_attempts', id, ARGV[3])
end
return 1
