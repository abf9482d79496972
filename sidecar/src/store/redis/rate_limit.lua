-- One GCRA step for a key's rate limit (the same arithmetic as auth::ratelimit::gcra).
-- KEYS[1]: the key's theoretical arrival time, microseconds (a plain string).
-- ARGV[1]: microseconds between requests at the steady rate; ARGV[2]: burst.
-- Returns 0 when the request may go, else the microseconds until one would pass.
-- The server's clock, so every gateway replica counts on the same time line.
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local window = interval * tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
if new_tat - now > window then
  return new_tat - now - window
end
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return 0
