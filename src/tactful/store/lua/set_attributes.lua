--[[
  SetAttributes (fenced, with includes/merge_attributes.lua): merges attributes, all from one
  source, and returns the whole profile as it is right after, atomically. A call that would
  leave the user more attributes than the cap changes nothing. The user id goes in the
  profile hash too (field user_id), so an export can name the user: keys only hold a digest
  of it.
    Input:
      KEYS[1] the user's attributes hash (name -> "<source>|<updated_at>|<value>")
      KEYS[2] the user's profile hash
      KEYS[3..5] (only to have the profile returned) the user's signals, contacts and
              cooldowns hashes
      ARGV[1] source ('1' STATED, '2' IMPORTED)
      ARGV[2] now (the attributes' updated_at, as stored)
      ARGV[3] the most attributes a user holds
      ARGV[4] the user id
      ARGV[5..] (name, value) pairs (an empty value removes)
    Output:
      {1, profile, signals, contacts, cooldowns, attributes} (each HGETALL's reply), or {1}
      without KEYS[3..5]; {0, count} when the call would leave count attributes, over the cap
      (nothing written); or 'erased' (includes/fence.lua)
]]
local ok, count = merge_attributes(KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3]), 5, #ARGV)
if ok == 0 then return {0, count} end
redis.call('HSET', KEYS[2], 'user_id', ARGV[4])
if #KEYS < 5 then return {1} end
return {1, redis.call('HGETALL', KEYS[2]), redis.call('HGETALL', KEYS[3]),
  redis.call('HGETALL', KEYS[4]), redis.call('HGETALL', KEYS[5]), redis.call('HGETALL', KEYS[1])}
