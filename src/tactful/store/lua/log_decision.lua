--[[
  Log a decision, the part in the user's slot (fenced, with includes/claim_request.lua): the
  decision goes on the user's decision index, which forgets decisions past their TTL and
  names the oldest beyond the most it keeps, for the caller to delete and then take off the
  index (so the index names every decision kept until it is gone). With a request id, the
  id goes on the request-id index likewise (past its TTL or beyond the most kept, the oldest
  are forgotten), and is claimed here unless the caps script claimed it already.
    Input:
      KEYS[1] the user's decision index (zset: decision_id -> made at)
      KEYS[2] the user's request ids (hash: request_id -> "<decision_id>|<made at>")
      KEYS[3] the user's request-id index (zset: request_id -> made at)
      ARGV[1] decision id
      ARGV[2] made at (seconds)
      ARGV[3] decision TTL (seconds)
      ARGV[4] the most decisions the index keeps
      ARGV[5] request id ('' for none)
      ARGV[6] '1' to claim the request id here, '0' when the caps script claimed it
      ARGV[7] request-id TTL (seconds)
      ARGV[8] the most request ids the index keeps
    Output:
      {'+', decision ids beyond the most kept...}, or
      {'!', decision_id} when the request id belongs to another decision (nothing written);
      or 'erased' (includes/fence.lua)
]]
local id, now, ttl, most = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local rid, rttl, rmost = ARGV[5], tonumber(ARGV[7]), tonumber(ARGV[8])
if rid ~= '' then
  if ARGV[6] == '1' then
    local owner = claim_request(KEYS[2], rid, id, ARGV[2], rttl)
    if owner then return {'!', owner} end
  end
  redis.call('ZADD', KEYS[3], now, rid)
  local gone = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', '(' .. (now - rttl), 'LIMIT', 0, 100)
  local over = redis.call('ZCARD', KEYS[3]) - #gone - rmost
  if over > 0 then
    for _, old in ipairs(redis.call('ZRANGE', KEYS[3], #gone, #gone + over - 1)) do
      gone[#gone + 1] = old
    end
  end
  if #gone > 0 then
    redis.call('HDEL', KEYS[2], unpack(gone))
    redis.call('ZREM', KEYS[3], unpack(gone))
  end
  redis.call('EXPIRE', KEYS[2], rttl)
  redis.call('EXPIRE', KEYS[3], rttl)
end
redis.call('ZADD', KEYS[1], now, id)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - ttl))
local dropped = {'+'}
local over = redis.call('ZCARD', KEYS[1]) - most
if over > 0 then
  -- Named, not removed: the caller deletes them, then takes them off the index (so the index
  -- names them until they are gone, and a failed delete is tried again next time).
  for _, old in ipairs(redis.call('ZRANGE', KEYS[1], 0, over - 1)) do
    dropped[#dropped + 1] = old
  end
end
redis.call('EXPIRE', KEYS[1], ttl)
return dropped
