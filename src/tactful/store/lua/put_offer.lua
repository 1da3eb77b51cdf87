--[[
  PutOffer: puts an offer if every segment it names exists, checked in the same script as
  the write, so a DeleteSegment cannot remove a segment in between. A catalog write bumps the
  version, so every process reloads offers and segments together.
    Input:
      KEYS[1] the catalog's offers hash (offer_id -> offer JSON)
      KEYS[2] the catalog's segments hash (segment_id -> segment JSON)
      KEYS[3] the catalog's version counter
      ARGV[1] offer id
      ARGV[2] offer JSON
      ARGV[3..] the segment ids the offer names
    Output:
      the named segment ids that do not exist (nothing written), or an empty list when the
      offer was put
]]
local missing = {}
for i = 3, #ARGV do
  if redis.call('HEXISTS', KEYS[2], ARGV[i]) == 0 then missing[#missing + 1] = ARGV[i] end
end
if #missing > 0 then return missing end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('INCR', KEYS[3])
return missing
