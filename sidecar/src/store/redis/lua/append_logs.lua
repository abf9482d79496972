-- Appends log lines to a running job, keeping the last `max lines`.
-- KEYS (routing only: a Redis Cluster sends the script to their slot; the script names
--   every key from P, and the job hashes it reaches carry the same hash tag):
--   P job:<id>, P logs:<id>
-- ARGV: P, id, max lines, line...
-- Returns 1 appended | 0 the job is not running
local id = ARGV[2]
if redis.call('HGET', jkey(id), 'phase') ~= 'r' then return 0 end
local k = P .. 'logs:' .. id
local i = 4
while i <= #ARGV do
  local j = math.min(i + 499, #ARGV)
  redis.call('RPUSH', k, unpack(ARGV, i, j))
  i = j + 1
end
redis.call('LTRIM', k, -tonumber(ARGV[3]), -1)
redis.call('PUBLISH', P .. 'events', 'logs')
return 1
