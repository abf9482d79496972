-- Stores a new job and queues it, atomically with its Idempotency-Key.
-- KEYS (routing only: a Redis Cluster sends the script to their slot; the script names
--   every key from P, and the job hashes it reaches carry the same hash tag):
--   P queue, P deadlines, P seq, P activity, P job:<id>, and P idem:<key> with a key
-- ARGV: P, id, spec, body, prio, deadline, max_queue, submitted, webhook, owner, at,
--   idempotency key ('' = none), fingerprint
-- Returns {0, position} stored | {1, position, first id} replayed | {-3, 0, first id} key
--   used for another request | {-1, queue length} full | {-2} id taken
local id = ARGV[2]
local jk = jkey(id)
local ik = ''
if ARGV[12] and ARGV[12] ~= '' then
  ik = P .. 'idem:' .. ARGV[12]
  -- "fingerprint first-id position"; a key whose job is gone (purged) is free again.
  local v = redis.call('GET', ik)
  if v then
    local fp, first, pos = string.match(v, '^(%x+) (%S+) (%d+)$')
    if first and redis.call('EXISTS', jkey(first)) == 1 then
      if fp == ARGV[13] then return {1, tonumber(pos), first} end
      return {-3, 0, first}
    end
  end
end
if redis.call('EXISTS', jk) == 1 then
  -- The same submit again (a write pipeline retried after a failover): already stored.
  local f = redis.call('HMGET', jk, 'submitted', 'owner')
  if f[1] == ARGV[8] and f[2] == ARGV[10] then
    return {0, redis.call('ZRANK', P .. 'queue', id) or 0}
  end
  return {-2}
end
local n = redis.call('ZCARD', P .. 'queue')
if n >= tonumber(ARGV[7]) then return {-1, n} end
local seq = redis.call('INCR', P .. 'seq')
local fields = {'spec', ARGV[3], 'body', ARGV[4], 'seq', seq, 'prio', ARGV[5],
  'phase', 'q', 'attempts', 0, 'token', 0, 'lease', 0, 'started', 0, 'cancel', 0,
  'submitted', ARGV[8], 'deadline', ARGV[6], 'owner', ARGV[10]}
if ARGV[9] ~= '' then
  table.insert(fields, 'webhook')
  table.insert(fields, ARGV[9])
end
if ik ~= '' then
  table.insert(fields, 'idem')
  table.insert(fields, ARGV[12])
end
redis.call('HSET', jk, unpack(fields))
enqueue(id, jk)
local pos = redis.call('ZRANK', P .. 'queue', id)
-- Stored with the job, and deleted with it when retention purges it.
if ik ~= '' then redis.call('SET', ik, ARGV[13] .. ' ' .. id .. ' ' .. pos) end
redis.call('SET', P .. 'activity', ARGV[11])
redis.call('PUBLISH', P .. 'events', 'submit')
return {0, pos}
