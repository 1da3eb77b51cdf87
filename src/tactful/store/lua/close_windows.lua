--[[
  Close reward windows: for each decision still awaiting, every chosen offer whose reward was
  not sent goes to the learner with reward 0 (the default reward), and the decision's window
  bookkeeping goes. A decision already closed is skipped, so a retry sends nothing twice.
  The decision log is in other slots: the caller reads it first and passes the vectors.
    Input:
      KEYS[1] the awaiting zset (decision_id -> reward window end)
      KEYS[2] the learned hash (decision_id -> JSON list of the offers whose reward was sent)
      KEYS[3] the reward stream
      ARGV[1] now (seconds)
      ARGV[2..] per decision: decision id, n, and n (offer_id, packed feature vector) pairs
    Output:
      the number of rewards sent
]]
local sent = 0
local i = 2
while i <= #ARGV do
  local id, n = ARGV[i], tonumber(ARGV[i + 1])
  if redis.call('ZREM', KEYS[1], id) == 1 then
    local learned = {}
    local before = redis.call('HGET', KEYS[2], id)
    if before then
      for _, offer in ipairs(cjson.decode(before)) do learned[offer] = true end
      redis.call('HDEL', KEYS[2], id)
    end
    for j = i + 2, i + 2 * n, 2 do
      local offer = ARGV[j]
      if not learned[offer] then
        learned[offer] = true
        redis.call('XADD', KEYS[3], '*', 'd', id, 'o', offer, 'r', '0', 'x', ARGV[j + 1],
          't', ARGV[1])
        sent = sent + 1
      end
    end
  end
  i = i + 2 + 2 * n
end
return sent
