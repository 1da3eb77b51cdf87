--[[
  Send an offer's reward to the learner: the first one for the offer, and only while the
  decision's reward window is open (its decision id still awaiting). Sent again, it sends
  nothing twice.
    Input:
      KEYS[1] the awaiting zset (decision_id -> reward window end)
      KEYS[2] the learned hash (decision_id -> JSON list of the offers whose reward was sent)
      KEYS[3] the reward stream
      ARGV[1] decision id
      ARGV[2] offer id
      ARGV[3] reward
      ARGV[4] the offer's feature vector, packed (store/reward_vectors.py)
      ARGV[5] now (seconds)
    Output:
      1 if the reward was sent, 0 if not (the window is closed, or it was sent before)
]]
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
local sent = redis.call('HGET', KEYS[2], ARGV[1])
local offers = {}
if sent then offers = cjson.decode(sent) end
for _, id in ipairs(offers) do if id == ARGV[2] then return 0 end end
offers[#offers + 1] = ARGV[2]
redis.call('HSET', KEYS[2], ARGV[1], cjson.encode(offers))
redis.call('XADD', KEYS[3], '*', 'd', ARGV[1], 'o', ARGV[2], 'r', ARGV[3], 'x', ARGV[4],
  't', ARGV[5])
return 1
