--[[
  claim_request(key, rid, decision, now, rttl): claims request id ``rid`` for ``decision``
  in the user's request-id hash ``key``, first come first served. The hash holds
  request_id -> "<decision_id>|<made at>", ``now`` (ARGV text, stored as given) being the
  time the claim is made. A claim older than ``rttl`` seconds is stale and is taken over; a
  claim holding no time never goes stale.
    Returns:
      the decision that holds the request id, when another decision claimed it within the
      last ``rttl`` seconds (nothing written); otherwise nil, the claim now being
      ``decision``'s
]]
local function claim_request(key, rid, decision, now, rttl)
  local claim = redis.call('HGET', key, rid)
  if claim then
    local bar = string.find(claim, '|', 1, true)
    local owner = bar and string.sub(claim, 1, bar - 1) or claim
    local made = bar and tonumber(string.sub(claim, bar + 1)) or nil
    if owner ~= decision and (made == nil or tonumber(now) - made <= rttl) then return owner end
  end
  redis.call('HSET', key, rid, decision .. '|' .. now)
  return nil
end
