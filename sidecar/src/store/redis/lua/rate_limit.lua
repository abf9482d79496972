-- Up to ARGV[3] GCRA steps at once for a key's rate limit (the same arithmetic as
-- auth::ratelimit::gcra_take).
-- KEYS[1]: the key's theoretical arrival time, microseconds (a plain string).
-- ARGV[1]: microseconds between requests at the steady rate; ARGV[2]: burst;
-- ARGV[3]: tokens wanted.
-- Returns {granted, 0}, or {0, microseconds until one request would pass}.
-- The server's clock, so every gateway replica counts on the same time line.
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local window = interval * tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local fits = math.floor((now + window - tat) / interval)
if fits < 1 then
  return {0, tat + interval - now - window}
end
local n = math.min(fits, math.max(1, tonumber(ARGV[3])))
local new_tat = tat + n * interval
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {n, 0}
