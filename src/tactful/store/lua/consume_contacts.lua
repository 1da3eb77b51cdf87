--[[
  Check and consume a decision's contacts, atomically, for one user (fenced, with
  includes/claim_request.lua), so concurrent Decides for the same user, in any number of
  processes, can never pass a cap. The request id is claimed here too, atomically with the
  counting: one request id is one decision, counted once. Idempotent per decision: the same
  decision's write sent again (a retried round trip whose reply was lost) gets the answer it
  got the first time, and counts nothing twice.

  The contacts hash (counters of the user's calendar day, in their time zone):
    "<day>|*|"          every channel
    "<day>|!|"          interruptive channels
    "<day>|<ch>|"       one channel
    "<day>|*|<offer>"   one offer, every channel
    "<day>|<ch>|<offer>"  one offer on one channel
    "last|<ch>"         when the channel was last used (for minimum gaps)
    "spent"             what the last decisions that consumed counted: entries
                        "<decision_id>\n<offer>\n<offer>...", newest first, tab-separated
    "last|~day"         the mark (DAY_MARK): the day every counter of the hash belongs to,
                        kept by this script; absent while a counter of a day not yet begun
                        (by this server's clock: another one's may be ahead) is in the hash

  Fields of other days go first, when the mark is not the caller's day (a new day, a change
  of time zone, or a hash without the mark): a field of a day that overlaps today (another
  zone's: the rule of contact_policy.carried_over, of which this script is the authority) is
  added to today's field of the same channel and offer; a field of a day past is dropped.
  Every field of the hash is looked at, not only those the caller read, so a Decide that
  read the profile before a change of zone still counts what a Decide made after it folded
  into the new zone's day. Only then: on other calls the hash holds today's counters alone,
  and scanning it (a field per offer served today) would cost Redis time on every Decide.

    Input:
      KEYS[1] the user's contacts hash
      KEYS[2] the user's profile hash: the customer's own cap (max_per_day) is read here,
              inside the script, so a SetPreferences racing with Decides is honoured at once
      KEYS[3] the user's request ids (hash: request_id -> "<decision_id>|<made at>")
      ARGV[1]  day: the start of the user's calendar day (seconds, as the fields hold it)
      ARGV[2]  now (seconds)
      ARGV[3]  channel
      ARGV[4]  daily cap, every channel (0: none)
      ARGV[5]  channel cap (0: none)
      ARGV[6]  '1' if the channel interrupts (the customer's own cap applies), else '0'
      ARGV[7]  least seconds between two messages on the channel (0: none)
      ARGV[8]  counters' TTL (seconds)
      ARGV[9]  slots wanted: the most offers to count
      ARGV[10] decision id
      ARGV[11] request id ('' for none)
      ARGV[12] request-id TTL (seconds)
      ARGV[13] CARRY_SECONDS: a day that began more than this before today's is over
      ARGV[14] DAY_MARK: the mark's field
      ARGV[15] n, the number of stale fields
      ARGV[16..15+n] other fields to drop ("last|<channel>" of long ago)
      then (offer_id, offer's own cap (0: none)) pairs in the policy's order: the
        best-ranked offer wins the last unit of a cap
    Output:
      {'+', offers consumed...} (no offer when a cap or the gap left nothing);
      {'!', decision_id} when the request id already belongs to another decision made
      within its TTL: a concurrent Decide with the same request id won, and nothing is
      counted for this one; or 'erased' (includes/fence.lua)
]]
local day, now, channel = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local daily, chcap = tonumber(ARGV[4]), tonumber(ARGV[5])
local ucap = tonumber(redis.call('HGET', KEYS[2], 'max_per_day') or '0')
local interruptive, gap = ARGV[6] == '1', tonumber(ARGV[7])
local ttl, want = ARGV[8], tonumber(ARGV[9])
local decision, rid, rttl = ARGV[10], ARGV[11], tonumber(ARGV[12])
local CARRY_SECONDS, DAY_MARK = tonumber(ARGV[13]), ARGV[14]
local n_stale = tonumber(ARGV[15])
local function mark(clean)
  if clean then
    redis.call('HSET', KEYS[1], DAY_MARK, day)
  else
    redis.call('HDEL', KEYS[1], DAY_MARK)
  end
end
-- 'spent': what the user's last SPENT_KEPT decisions counted, newest first, an entry a
-- decision (its id, then the offers, a line each), entries separated by tabs: a write resent
-- after a lost reply answers what it counted, even when other Decides came between.
local SPENT_KEPT = 16
local spent = redis.call('HGET', KEYS[1], 'spent')
local kept_spends = {}
if spent then
  for entry in string.gmatch(spent, '[^\t]+') do
    local parts = {}
    for part in string.gmatch(entry, '[^\n]+') do parts[#parts + 1] = part end
    if parts[1] == decision then
      parts[1] = '+'
      return parts
    end
    if #kept_spends < SPENT_KEPT - 1 then kept_spends[#kept_spends + 1] = entry end
  end
end
if rid ~= '' then
  local owner = claim_request(KEYS[3], rid, decision, ARGV[2], rttl)
  if owner then return {'!', owner} end
  redis.call('EXPIRE', KEYS[3], rttl)
end
local clean = true  -- no counter of another day is left in the hash
if redis.call('HGET', KEYS[1], DAY_MARK) ~= day then
  local today = tonumber(day)
  local fields = redis.call('HGETALL', KEYS[1])
  for i = 1, #fields, 2 do
    local field = fields[i]
    local bar = string.find(field, '|', 1, true)
    local from = bar and tonumber(string.sub(field, 1, bar - 1))
    if from and from ~= today then
      if from > today - CARRY_SECONDS and from <= now then
        redis.call('HINCRBY', KEYS[1], day .. string.sub(field, bar), tonumber(fields[i + 1]))
        redis.call('HDEL', KEYS[1], field)
      elseif from <= today - CARRY_SECONDS then
        redis.call('HDEL', KEYS[1], field)
      else
        clean = false  -- a day not begun by our clock: kept, and looked at again next time
      end
    end
  end
  if #fields > 0 then mark(clean) end
end
for i = 16, 15 + n_stale do redis.call('HDEL', KEYS[1], ARGV[i]) end
if gap > 0 then
  local last = tonumber(redis.call('HGET', KEYS[1], 'last|' .. channel) or '0')
  if now - last < gap then return {'+'} end
end
local function count(field) return tonumber(redis.call('HGET', KEYS[1], field) or '0') end
local f_all, f_int, f_ch = day .. '|*|', day .. '|!|', day .. '|' .. channel .. '|'
local n_all, n_int, n_ch = count(f_all), count(f_int), count(f_ch)
local chosen = {'+'}
for i = 16 + n_stale, #ARGV, 2 do
  if #chosen > want then break end
  if (daily > 0 and n_all >= daily) or (chcap > 0 and n_ch >= chcap)
     or (interruptive and ucap > 0 and n_int >= ucap) then break end
  local offer, ocap = ARGV[i], tonumber(ARGV[i + 1])
  local f_offer = day .. '|*|' .. offer
  if ocap == 0 or count(f_offer) < ocap then
    redis.call('HINCRBY', KEYS[1], f_all, 1)
    redis.call('HINCRBY', KEYS[1], f_ch, 1)
    redis.call('HINCRBY', KEYS[1], f_offer, 1)
    redis.call('HINCRBY', KEYS[1], day .. '|' .. channel .. '|' .. offer, 1)
    n_all, n_ch = n_all + 1, n_ch + 1
    if interruptive then
      redis.call('HINCRBY', KEYS[1], f_int, 1)
      n_int = n_int + 1
    end
    chosen[#chosen + 1] = offer
  end
end
if #chosen > 1 then
  mark(clean)
  redis.call('HSET', KEYS[1], 'last|' .. channel, ARGV[2])
  local entry = decision .. '\n' .. table.concat(chosen, '\n', 2)
  redis.call('HSET', KEYS[1], 'spent', entry .. (#kept_spends > 0 and '\t' or '')
    .. table.concat(kept_spends, '\t'))
  redis.call('EXPIRE', KEYS[1], ttl)
end
return chosen
