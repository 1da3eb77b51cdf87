--[[
  Add inferred signals (fenced), only for a user who consented to the use of their
  behaviour: without consent the signals are not kept at all. What is stored is decayed to
  the new observation's time, then added to. RecordSignals adds observations, so the same
  ones sent twice count twice. A bulk import sends a signal's state instead (its weight at
  observed_at, as GetProfile and the export show it) with half-life 0: the stored value of
  the topic is replaced, not added to, so importing a file again leaves the same state.
    Input:
      KEYS[1] the user's signals hash (topic -> "<weight>|<observed_at>")
      KEYS[2] the user's profile hash (its consent field)
      ARGV[1] half-life (seconds; 0: replace)
      ARGV[2] the most topics a user may have signals of
      ARGV[3..] (topic, weight, observed_at) triples
    Output:
      1 kept; 0 no consent (nothing written); minus the count of topics the call would have
      left, when that is over the cap (nothing written); or 'erased' (includes/fence.lua)
]]
local consent = redis.call('HGET', KEYS[2], 'consent')
if not consent or string.sub(consent, 1, 1) ~= '1' then return 0 end
local half_life, cap = tonumber(ARGV[1]), tonumber(ARGV[2])
local count = redis.call('HLEN', KEYS[1])
local seen = {}
for i = 3, #ARGV, 3 do
  if not seen[ARGV[i]] and redis.call('HEXISTS', KEYS[1], ARGV[i]) == 0 then count = count + 1 end
  seen[ARGV[i]] = true
end
if count > cap then return -count end
for i = 3, #ARGV, 3 do
  local topic, w, t = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local old = false
  if half_life > 0 then old = redis.call('HGET', KEYS[1], topic) end
  if old then
    local sep = string.find(old, '|', 1, true)
    local w0, t0 = tonumber(string.sub(old, 1, sep - 1)), tonumber(string.sub(old, sep + 1))
    if t >= t0 then
      w = w0 * (0.5 ^ ((t - t0) / half_life)) + w
    else
      w = w0 + w * (0.5 ^ ((t0 - t) / half_life))
      t = t0
    end
  end
  redis.call('HSET', KEYS[1], topic, string.format('%.17g|%.6f', w, t))
end
return 1
