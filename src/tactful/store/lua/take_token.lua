--[[
  A token bucket: take one token if there is one. Time is Redis's own (TIME), so every server
  process and pod agrees on it.
    Input:
      KEYS[1] the bucket hash (tokens, at)
      ARGV[1] tokens per second
      ARGV[2] bucket size
    Output:
      "0" when a token was taken, else the seconds until one will be there (a string: Lua
      numbers would come back truncated to integers)
]]
redis.replicate_commands()
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return tostring(wait)
