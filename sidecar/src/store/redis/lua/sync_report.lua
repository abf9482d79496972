-- A gateway's report of the sync calls it holds or has in flight (counted by load.lua
-- until `ttl` passes without a new report); its latest sync call counts as activity;
-- `wake` publishes a `wake` event so the autoscaler acts at once.
-- KEYS (routing only: a Redis Cluster sends the script to their slot; the script names
--   every key from P, and the job hashes it reaches carry the same hash tag):
--   P sync, P activity
-- ARGV: P, gateway id, count, last sync call ms, ttl ms, wake (1/0)
-- Returns 1
local exp = string.format('%.0f', rtime() + tonumber(ARGV[5]))
redis.call('HSET', P .. 'sync', ARGV[2], ARGV[3] .. ':' .. exp)
if tonumber(ARGV[4]) > tonumber(redis.call('GET', P .. 'activity') or '0') then
  redis.call('SET', P .. 'activity', ARGV[4])
end
if ARGV[6] == '1' then redis.call('PUBLISH', P .. 'events', 'wake') end
return 1
