-- Extends the lease of a claimed job whose fencing token matches.
-- KEYS (routing only: a Redis Cluster sends the script to their slot; the script names
--   every key from P, and the job hashes it reaches carry the same hash tag):
--   P running, P job:<id>
-- ARGV: P, id, token, lease_ms
-- Returns -1 lost, else the cancel flag
local jk = jkey(ARGV[2])
local f = redis.call('HMGET', jk, 'phase', 'token', 'cancel')
if f[1] ~= 'r' or f[2] ~= ARGV[3] then return -1 end
local lease_until = rtime() + tonumber(ARGV[4])
redis.call('HSET', jk, 'lease', lease_until)
redis.call('ZADD', P .. 'running', lease_until, ARGV[2])
return tonumber(f[3])
