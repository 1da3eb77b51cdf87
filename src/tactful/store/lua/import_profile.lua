--[[
  One imported profile (fenced, with includes/merge_attributes.lua), as one script in the
  user's slot, so a batch is one command and one small reply per user. In order: the profile
  hash's fields cleared (NEUTRAL stances) and set (user id, stances, opt-ins, limits,
  consent: as SetPreferences writes them); the signals deleted if consent is withdrawn; each
  group of attributes merged by SetAttributes' own merge (one group per source and time);
  then the signals as record_signals.lua writes them in its replacing mode (half-life 0: each
  replaces its topic's state), only if the profile, as now written, holds consent. A line
  that would pass a per-user bound, or whose attributes would pass the cap, is refused whole:
  nothing of it is written.
    Input:
      KEYS[1] the user's profile hash
      KEYS[2] the user's attributes hash
      KEYS[3] the user's signals hash
      ARGV[1] the most attributes a user holds
      ARGV[2] '1' if consent is withdrawn (the signals go), else '0'
      ARGV[3] c, the number of profile fields to clear
      ARGV[4] s, the number of (field, value) pairs to set
      ARGV[5] the most topic stances a user holds
      ARGV[6] the most channel choices a user holds
      ARGV[7] the most topics a user may have signals of
      ARGV[8..] the c fields to clear, then the s (field, value) pairs to set
      then g, the number of attribute groups, and each group as source ('1' STATED,
        '2' IMPORTED), updated_at, p, and p (name, value) pairs
      then (topic, weight, observed_at) triples, to the end
    Output:
      -1, -2 or -3: the line would pass the bound of topic stances, channel choices or signal
      topics (nothing written); else refused * 3 + signals, refused being the most
      attributes a refused group would have left (0: none refused; nothing written
      otherwise) and signals 0 (none given), 1 (not kept: no consent) or 2 (kept); or
      'erased' (includes/fence.lua)
]]
local cap = tonumber(ARGV[1])
local n_clear, n_set = tonumber(ARGV[3]), tonumber(ARGV[4])
local profile_at = 8
local i = profile_at + n_clear + 2 * n_set
-- The per-user bounds of SetPreferences and RecordSignals, before anything is written.
do
  local new = {t = 0, c = 0}
  for j = profile_at + n_clear, i - 1, 2 do
    local kind = string.sub(ARGV[j], 1, 1)
    if new[kind] and string.sub(ARGV[j], 2, 2) == ':'
        and redis.call('HEXISTS', KEYS[1], ARGV[j]) == 0 then
      new[kind] = new[kind] + 1
    end
  end
  if new.t + new.c > 0 then
    local held = {t = 0, c = 0}
    for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
      local kind = string.sub(field, 1, 1)
      if held[kind] and string.sub(field, 2, 2) == ':' then held[kind] = held[kind] + 1 end
    end
    for j = profile_at, profile_at + n_clear - 1 do
      local kind = string.sub(ARGV[j], 1, 1)
      if held[kind] and redis.call('HEXISTS', KEYS[1], ARGV[j]) == 1 then
        held[kind] = held[kind] - 1
      end
    end
    if new.t > 0 and held.t + new.t > tonumber(ARGV[5]) then return -1 end
    if new.c > 0 and held.c + new.c > tonumber(ARGV[6]) then return -2 end
  end
  local j = i + 1
  for _ = 1, tonumber(ARGV[i]) do j = j + 3 + 2 * tonumber(ARGV[j + 2]) end
  if j <= #ARGV then
    local count = 0
    if ARGV[2] ~= '1' then count = redis.call('HLEN', KEYS[3]) end
    local seen = {}
    for k = j, #ARGV, 3 do
      if not seen[ARGV[k]]
          and (ARGV[2] == '1' or redis.call('HEXISTS', KEYS[3], ARGV[k]) == 0) then
        count = count + 1
      end
      seen[ARGV[k]] = true
    end
    if count > tonumber(ARGV[7]) then return -3 end
  end
end
-- The attributes first: a line whose attributes would pass the cap is refused whole, so
-- they are merged before anything else is written, and put back as they were if a group is
-- refused (a script runs atomically: nobody sees the attributes in between).
local before = nil
local refused = 0
local groups = tonumber(ARGV[i])
i = i + 1
for _ = 1, groups do
  local source, at, n_pairs = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  i = i + 3
  if groups > 1 and before == nil then before = redis.call('HGETALL', KEYS[2]) end
  local ok, count = merge_attributes(KEYS[2], source, at, cap, i, i + 2 * n_pairs - 1)
  if ok == 0 and count > refused then refused = count end
  i = i + 2 * n_pairs
end
if refused > 0 then
  if before ~= nil then
    redis.call('DEL', KEYS[2])
    if #before > 0 then redis.call('HSET', KEYS[2], unpack(before)) end
  end
  return refused * 3
end
-- (SetAttributes' HSET of the user id is not repeated: the profile's, below, sets it.)
if n_clear > 0 then
  redis.call('HDEL', KEYS[1], unpack(ARGV, profile_at, profile_at + n_clear - 1))
end
if n_set > 0 then
  local first = profile_at + n_clear
  redis.call('HSET', KEYS[1], unpack(ARGV, first, first + 2 * n_set - 1))
end
if ARGV[2] == '1' then redis.call('DEL', KEYS[3]) end
if i > #ARGV then return 0 end
local consent = redis.call('HGET', KEYS[1], 'consent')
if not consent or string.sub(consent, 1, 1) ~= '1' then return refused * 3 + 1 end
for j = i, #ARGV, 3 do
  local w, t = tonumber(ARGV[j + 1]), tonumber(ARGV[j + 2])
  redis.call('HSET', KEYS[3], ARGV[j], string.format('%.17g|%.6f', w, t))
end
return refused * 3 + 2
