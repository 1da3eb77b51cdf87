--[[
  merge_attributes(key, source, at, cap, first, last): merges the (name, value) pairs
  ARGV[first..last] into the attributes hash ``key``, all from ``source`` ('1' STATED,
  '2' IMPORTED) at ``at``. Each is stored as "<source>|<updated_at>|<value>" (the value last:
  it may hold '|'). What the customer stated outranks a system of record: an IMPORTED value
  (setting or, empty, removing) leaves a STATED one alone; a STATED value replaces anything.
  An empty value removes. The cap is checked before anything is written. Shared by
  SetAttributes (set_attributes.lua) and the bulk import (import_profile.lua), so both merge
  alike.
    Returns:
      1, the count of attributes left; or 0 and the count it would have left, when that is
      over ``cap`` (nothing written)
]]
local function merge_attributes(key, source, at, cap, first, last)
  local stamp = source .. '|' .. at .. '|'
  local count = redis.call('HLEN', key)
  local names, olds = {}, {}
  for i = first, last, 2 do names[#names + 1] = ARGV[i] end
  if #names > 0 then olds = redis.call('HMGET', key, unpack(names)) end  -- not one HGET each
  local set, removed = {}, {}
  for i = first, last, 2 do
    local name, value = ARGV[i], ARGV[i + 1]
    local old = olds[(i - first) / 2 + 1]
    if not (source == '2' and old and string.sub(old, 1, 1) == '1') then
      if value == '' then
        if old then
          removed[#removed + 1] = name
          count = count - 1
        end
      else
        if not old then count = count + 1 end
        set[#set + 1] = name
        set[#set + 1] = stamp .. value
      end
    end
  end
  if count > cap then return 0, count end
  if #removed > 0 then redis.call('HDEL', key, unpack(removed)) end
  if #set > 0 then redis.call('HSET', key, unpack(set)) end
  return 1, count
end
