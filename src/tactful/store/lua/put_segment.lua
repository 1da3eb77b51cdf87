--[[
  PutSegment: puts a segment, unless it is new and the catalog already holds the most
  segments it may. A catalog write bumps the version, so every process reloads offers and
  segments together.
    Input:
      KEYS[1] the catalog's segments hash (segment_id -> segment JSON)
      KEYS[2] the catalog's version counter
      ARGV[1] segment id
      ARGV[2] segment JSON
      ARGV[3] the most segments the catalog holds
    Output:
      1 if the segment was put, 0 if the catalog is full (nothing written)
]]
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0
    and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('INCR', KEYS[2])
return 1
