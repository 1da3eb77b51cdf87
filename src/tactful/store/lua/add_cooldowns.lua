--[[
  Put offers or topics on a user's cooldown, after a DISMISS (fenced).
    Input:
      KEYS[1] the user's cooldowns hash ("o:<offer_id>" / "t:<topic>" -> until)
      ARGV[1] until (seconds)
      ARGV[2..] the fields to cool
    Output:
      1, or 'erased' (includes/fence.lua)
]]
for i = 2, #ARGV do redis.call('HSET', KEYS[1], ARGV[i], ARGV[1]) end
-- Every cooldown lasts the same time, so the newest ends last: the key goes with it.
redis.call('EXPIREAT', KEYS[1], math.floor(tonumber(ARGV[1])) + 1)
return 1
