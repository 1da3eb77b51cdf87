--[[
  Store an outcome, the part in the decision's slot: once per outcome_id, and only for a
  logged decision that chose the offer. Its reward goes to the learner by send_reward.lua,
  in the stream's slot.
    Input:
      KEYS[1] the decision's record (string: the logged decision, JSON)
      KEYS[2] the decision's outcomes hash (outcome_id -> outcome JSON)
      ARGV[1] offer id
      ARGV[2] outcome id
      ARGV[3] outcome JSON
    Output:
      {status, record, arm}, status 1 (recorded) or 0 (an outcome of that id was there
      already), record the logged decision (for its feature vector) or false when the
      offer has no feature vector, arm the decision's arm ('' when it has none);
      {-1, false} when there is no such decision, {-2, false} when the decision did not
      choose the offer
]]
local record = redis.call('GET', KEYS[1])
if not record then return {-1, false} end
local decision = cjson.decode(record)
local chosen = false
for _, id in ipairs(decision['offer_ids']) do if id == ARGV[1] then chosen = true end end
if not chosen then return {-2, false} end
local status = redis.call('HSETNX', KEYS[2], ARGV[2], ARGV[3])
-- The very same outcome (same JSON, same time) already there: a retried attempt of the
-- call that stored it, which must get that call's answer.
if status == 0 and redis.call('HGET', KEYS[2], ARGV[2]) == ARGV[3] then status = 1 end
if status == 1 then
  local ttl = redis.call('TTL', KEYS[1])
  if ttl > 0 then redis.call('EXPIRE', KEYS[2], ttl) end
end
local arm = decision['arm']
if type(arm) ~= 'string' then arm = '' end
local features = decision['features']
if type(features) == 'table' and features[ARGV[1]] then return {status, record, arm} end
return {status, false, arm}
