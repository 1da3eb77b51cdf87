--[[
  The erasure fence, opening every script that writes a user's keys: a call that was in
  flight while the user was erased must not re-create what the erasure deleted.
    Input (taken off KEYS and ARGV, so the script that follows reads its own as if they were
    never there):
      KEYS[#KEYS] the erasure fence zset of the user's slot (user digest -> erased at)
      ARGV[1]     the user's digest
      ARGV[2]     when the call started
    Output:
      "erased" if the user was erased at or after that time (nothing written); otherwise
      nothing: the script goes on
]]
local FENCE = table.remove(KEYS)
local FENCE_DIGEST = table.remove(ARGV, 1)
local FENCE_STARTED = tonumber(table.remove(ARGV, 1))
local ERASED_AT = redis.call('ZSCORE', FENCE, FENCE_DIGEST)
if ERASED_AT and tonumber(ERASED_AT) >= FENCE_STARTED then return 'erased' end
