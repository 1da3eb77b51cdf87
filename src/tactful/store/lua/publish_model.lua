--[[
  Publish a model version unless a rollback pinned one, and drop the versions beyond the
  newest ``keep``, in one atomic step: a rollback (rollback_model.lua) lands either before it
  (then nothing is published) or after it (then it wins), never in between, and never loses
  its version.
    Input:
      KEYS[1] the pinned marker
      KEYS[2] the versions zset (version -> published at)
      KEYS[3] the current version
      KEYS[4] the new version's snapshot
      ARGV[1] version
      ARGV[2] snapshot bytes
      ARGV[3] published at (seconds)
      ARGV[4] keep: how many versions are kept
      ARGV[5] what every snapshot's key begins with (the version follows)
    Output:
      1 if published, 0 if a version is pinned (nothing written)
]]
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[4], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('SET', KEYS[3], ARGV[1])
for _, old in ipairs(redis.call('ZRANGE', KEYS[2], 0, -(tonumber(ARGV[4]) + 1))) do
  redis.call('DEL', ARGV[5] .. old)
  redis.call('ZREM', KEYS[2], old)
end
return 1
