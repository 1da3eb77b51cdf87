--[[
  A learner that does not hold the lease hands what it learned to the one that does: its
  delta goes on the list of deltas, and the stream entries it covers are acknowledged, in one
  step, so each reward is in exactly one place (a delta, or the stream's pending entries).
  Refused if any of those entries is no longer this consumer's (the lease holder claimed
  them from a learner that looked dead): they are being learned elsewhere.
    Input:
      KEYS[1] the reward stream
      KEYS[2] the list of deltas not yet in the saved learner state
      ARGV[1] consumer group
      ARGV[2] this learner's consumer name
      ARGV[3] the delta (bytes)
      ARGV[4..] the stream entry ids the delta covers: all this consumer has pending
    Output:
      1 if pushed, 0 if refused (nothing written)
]]
local ids = #ARGV - 3
local summary = redis.call('XPENDING', KEYS[1], ARGV[1])
local mine = 0
for _, pair in ipairs(summary[4] or {}) do
  if pair[1] == ARGV[2] then
    mine = tonumber(pair[2])
  end
end
if mine ~= ids then
  return 0
end
redis.call('RPUSH', KEYS[2], ARGV[3])
-- In chunks: unpack has a limit of a few thousand values.
for first = 4, #ARGV, 1000 do
  redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, first, math.min(first + 999, #ARGV)))
end
return 1
