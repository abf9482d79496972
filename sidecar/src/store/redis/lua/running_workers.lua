-- The running jobs counted by the worker that holds them.
-- KEYS (routing only: a Redis Cluster sends the script to their slot; the script names
--   every key from P, and the job hashes it reaches carry the same hash tag):
--   P running
-- ARGV: P
-- Returns flat [worker, count]... of the running jobs
local ids = redis.call('ZRANGE', P .. 'running', 0, -1)
local counts = {}
for _, id in ipairs(ids) do
  local w = redis.call('HGET', jkey(id), 'worker') or ''
  counts[w] = (counts[w] or 0) + 1
end
local out = {}
for w, n in pairs(counts) do
  table.insert(out, w)
  table.insert(out, n)
end
return out
