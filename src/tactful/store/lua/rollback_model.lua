--[[
  Serve a kept model version again and pin it (the learner then publishes nothing), if it is
  still kept.
    Input:
      KEYS[1] the version's snapshot
      KEYS[2] the current version
      KEYS[3] the pinned marker
      ARGV[1] version
    Output:
      1 if rolled back, 0 if the version is no longer kept (nothing written)
]]
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('SET', KEYS[2], ARGV[1])
redis.call('SET', KEYS[3], ARGV[1])
return 1
