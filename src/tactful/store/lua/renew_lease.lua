--[[
  Renew the learner lease if this token holds it; with a TTL of 1 ms, let go of it.
    Input:
      KEYS[1] the lease (string: the holder's token)
      ARGV[1] token
      ARGV[2] TTL (ms)
    Output:
      1 if renewed, 0 if the token does not hold the lease
]]
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
