-- Gives a claimed job whose fencing token matches back to the queue.
-- KEYS (routing only: a Redis Cluster sends the script to their slot; the script names
--   every key from P, and the job hashes it reaches carry the same hash tag):
--   P running, P queue, P deadlines, P job:<id>, P logs:<id>
-- ARGV: P, id, token, refund ('1': the attempt is not counted, '0': it is)
-- Returns 1 queued again | 0 not running, or another token
local id = ARGV[2]
local jk = jkey(id)
local f = redis.call('HMGET', jk, 'phase', 'token', 'attempts')
if f[1] ~= 'r' or f[2] ~= ARGV[3] then return 0 end
redis.call('ZREM', P .. 'running', id)
local a = tonumber(f[3])
if ARGV[4] == '1' then a = a - 1 end
if a < 0 then a = 0 end
redis.call('HSET', jk, 'phase', 'q', 'attempts', a, 'lease', 0)
redis.call('DEL', P .. 'logs:' .. id)
enqueue(id, jk)
redis.call('PUBLISH', P .. 'events', 'release')
return 1
