--[[
  SetPreferences (fenced), atomically: the stances to clear and to set, the signals deleted
  if consent is withdrawn, and the whole profile returned as it is right after. A user holds
  at most ARGV[1] topic stances and ARGV[2] channel choices: a call that would leave more
  changes nothing.
    Input:
      KEYS[1] the user's profile hash
      KEYS[2] the user's signals hash
      KEYS[3] the user's contacts hash
      KEYS[4] the user's cooldowns hash
      KEYS[5] the user's attributes hash
      ARGV[1] the most topic stances ("t:<topic>" fields) a user holds
      ARGV[2] the most channel choices ("c:<channel>" fields) a user holds
      ARGV[3] '1' if consent is withdrawn (the signals go), else '0'
      ARGV[4] n, the number of fields to clear
      ARGV[5..4+n] those fields
      ARGV[5+n..] (field, value) pairs to set
    Output:
      {1, profile, signals, contacts, cooldowns, attributes} (each HGETALL's reply);
      {0, kind ('t' or 'c'), count} when the call would leave more than that kind's cap
      (nothing written); or 'erased' (includes/fence.lua)
]]
local n_clear = tonumber(ARGV[4])
local first_set = 5 + n_clear
local new = {t = 0, c = 0}
for i = first_set, #ARGV, 2 do
  local kind = string.sub(ARGV[i], 1, 2)
  if (kind == 't:' or kind == 'c:') and redis.call('HEXISTS', KEYS[1], ARGV[i]) == 0 then
    new[string.sub(kind, 1, 1)] = new[string.sub(kind, 1, 1)] + 1
  end
end
if new.t + new.c > 0 then
  local held = {t = 0, c = 0}
  for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
    local kind = string.sub(field, 1, 2)
    if kind == 't:' or kind == 'c:' then
      held[string.sub(kind, 1, 1)] = held[string.sub(kind, 1, 1)] + 1
    end
  end
  local cleared = {t = 0, c = 0}
  for i = 5, first_set - 1 do
    local kind = string.sub(ARGV[i], 1, 1)
    if cleared[kind] and redis.call('HEXISTS', KEYS[1], ARGV[i]) == 1 then
      cleared[kind] = cleared[kind] + 1
    end
  end
  for kind, cap in pairs({t = tonumber(ARGV[1]), c = tonumber(ARGV[2])}) do
    local count = held[kind] - cleared[kind] + new[kind]
    if new[kind] > 0 and count > cap then return {0, kind, count} end
  end
end
if n_clear > 0 then redis.call('HDEL', KEYS[1], unpack(ARGV, 5, first_set - 1)) end
if first_set <= #ARGV then redis.call('HSET', KEYS[1], unpack(ARGV, first_set, #ARGV)) end
if ARGV[3] == '1' then redis.call('DEL', KEYS[2]) end
return {1, redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2]),
  redis.call('HGETALL', KEYS[3]), redis.call('HGETALL', KEYS[4]), redis.call('HGETALL', KEYS[5])}
