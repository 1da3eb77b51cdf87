--[[
  DeleteSegment: deletes a segment that no offer names, checked in the same script as the
  delete, so a PutOffer cannot name it in between. Every offer is looked at: a DeleteSegment
  is a rare admin call on a catalog small enough for every process to hold in memory, and a
  scan needs no reverse index that could drift from the offers. A plain text search skips the
  JSON decoding of offers that cannot name it (ids are plain ASCII without quotes: JSON
  writes them as is).
    Input:
      KEYS[1] the catalog's segments hash (segment_id -> segment JSON)
      KEYS[2] the catalog's offers hash (offer_id -> offer JSON)
      KEYS[3] the catalog's version counter
      ARGV[1] segment id
    Output:
      {1} deleted; {0} no such segment; {-1, offer_id...} the offers that name it (nothing
      deleted)
]]
local id = ARGV[1]
if redis.call('HEXISTS', KEYS[1], id) == 0 then return {0} end
local needle = '"' .. id .. '"'
local result = {-1}
local offers = redis.call('HGETALL', KEYS[2])
for i = 1, #offers, 2 do
  local raw = offers[i + 1]
  if string.find(raw, needle, 1, true) then
    local offer = cjson.decode(raw)
    local named = false
    for _, list in ipairs({offer['segments'], offer['excluded_segments']}) do
      if type(list) == 'table' then
        for _, other in ipairs(list) do if other == id then named = true end end
      end
    end
    if named then result[#result + 1] = offers[i] end
  end
end
if #result > 1 then return result end
redis.call('HDEL', KEYS[1], id)
redis.call('INCR', KEYS[3])
return {1}
