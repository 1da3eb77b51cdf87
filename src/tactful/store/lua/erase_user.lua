--[[
  Erase a user, the part in the user's slot: the user goes on the erasure fence, and every
  key of the user but the two decision indexes is deleted. The caller deletes the decisions
  the indexes name (in their own slots), then the indexes: an erasure retried after a
  failure in between finds them again.
    Input:
      KEYS[1]           the erasure fence zset of the user's slot
      KEYS[2..#KEYS-2]  the user's keys to delete
      KEYS[#KEYS-1]     the user's old decision index (set)
      KEYS[#KEYS]       the user's decision index (zset)
      ARGV[1] the user's digest
      ARGV[2] erased at (seconds)
      ARGV[3] how long an erased user stays on the fence (seconds)
    Output:
      the decision ids of both indexes
]]
local at, keep = tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], at, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (at - keep))
redis.call('EXPIRE', KEYS[1], math.ceil(keep))
local ids = redis.call('SMEMBERS', KEYS[#KEYS - 1])
for _, id in ipairs(redis.call('ZRANGE', KEYS[#KEYS], 0, -1)) do ids[#ids + 1] = id end
redis.call('DEL', unpack(KEYS, 2, #KEYS - 2))
return ids
