"""The contact policy: how often, when, and after what a user may be contacted.

Caps (all counted per user per *calendar day in the user's time zone*: the zone of their quiet
hours, UTC when they set none; a day, not a sliding 24 h, because that is what a customer
means by "at most two e-mails a day", and the preference centre can say when it resets):

- ``TACTFUL_DAILY_CAP``: messages over all channels together;
- ``TACTFUL_CHANNEL_CAPS``: messages on one channel;
- the customer's own ``max_messages_per_day``: messages on interruptive channels together;
- the offer's own ``max_per_user_per_day``: that offer, over all channels.

The lowest applicable cap wins. ``TACTFUL_MIN_GAP_SECONDS`` keeps a least time between two
messages on a channel. Quiet hours hold interruptive channels (``TACTFUL_INTERRUPTIVE_CHANNELS``)
in the customer's own time zone. A DISMISS puts the offer (and, if configured, its topics) on a
cooldown for that user.

Decide checks caps twice: first against the counters its one read returned (so it draws no
more slots than remain, and leaves out offers at their own cap), then atomically in Redis
(``CONSUME_CONTACTS_LUA``) when it consumes what it returns, so concurrent Decides for the same
user, in any number of processes, can never exceed a cap. Only what is returned, and not in a
dry run, is counted.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

from tactful.domain import Offer, Profile
from tactful.settings import ContactSettings

ALL_CHANNELS = "*"  # counter of every channel together
INTERRUPTIVE = "!"  # counter of the interruptive channels together
COUNTERS_TTL_SECONDS = 3 * 86400  # a day's counters, plus slack for any time zone


@lru_cache(maxsize=1024)
def _zone(name: str) -> dt.tzinfo:
    try:
        return zoneinfo.ZoneInfo(name) if name else dt.UTC
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return dt.UTC


@dataclass(frozen=True, slots=True)
class Window:
    """The user's current calendar day."""

    start: float
    end: float

    @property
    def key(self) -> str:
        return str(int(self.start))


@dataclass(frozen=True, slots=True)
class Limits:
    """The caps that apply to one user on one channel; 0 means no such cap."""

    daily: int
    channel: int
    user: int  # the customer's own, when the channel interrupts
    gap_seconds: float
    interruptive: bool


@dataclass(frozen=True, slots=True)
class Capacity:
    """What the counters of the read allow: how many more messages, and from when on the
    channel is open again if it is closed."""

    remaining: int  # -1: unlimited
    open_again: float | None


#: The caps script's mark: the day every counter of the contacts hash belongs to. Named as a
#: "last|<channel>" field because versions before the mark read such fields as a channel's
#: last contact time, so they tolerate it during a rolling upgrade or a rollback (and no
#: channel can be called "~day").
DAY_MARK = "last|~day"

#: A day that began more than this before today's is over, even if it was a long (25-hour) day
#: of another zone; yesterday in the same zone always began at least this long before today.
CARRY_SECONDS = 23 * 3600


def carried_over(start: float, window: Window, now: float) -> bool:
    """Whether counters of the day that began at ``start`` count today, as ``window``'s.

    They do when that day is another zone's and overlaps today: the customer moved to another
    time zone (today or yesterday), and what they were sent in the old zone's day may have
    been sent today in the new one (a move of zone must never reset a cap). Message times are
    not kept, so the whole old day counts: a cap can only be met early, never passed. The day
    before in the same zone is never carried: it began at least 23 hours (a spring-forward
    day) before this one, and ended when this one began. ``CONSUME_CONTACTS_LUA`` applies the
    same rule, on every field of the hash, when it consumes."""
    return start != window.start and window.start - CARRY_SECONDS < start <= now


def counter_field(window: Window | str, channel: str, offer_id: str = "") -> str:
    key = window.key if isinstance(window, Window) else window
    return f"{key}|{channel}|{offer_id}"


class ContactPolicy:
    def __init__(self, settings: ContactSettings) -> None:
        self.daily_cap = settings.daily_cap
        self.channel_caps = {ch: int(n) for ch, n in settings.channel_caps}
        self.gaps = dict(settings.min_gap_seconds)
        self.interruptive = frozenset(settings.interruptive_channels)
        self.cooldown_seconds = settings.dismiss_cooldown_hours * 3600.0
        self.cools_topics = settings.dismiss_cools_topics

    def window(self, now: float, profile: Profile) -> Window:
        zone = _zone(profile.quiet_hours.time_zone if profile.quiet_hours else "")
        local = dt.datetime.fromtimestamp(now, zone)
        midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
        tomorrow = (midnight + dt.timedelta(days=1)).replace(tzinfo=None)
        end = tomorrow.replace(tzinfo=zone).timestamp()  # DST-safe: local midnight again
        return Window(midnight.timestamp(), end)

    def quiet_until(self, now: float, profile: Profile, channel: str) -> float | None:
        """When the user's quiet hours end, if they hold this channel now."""
        quiet = profile.quiet_hours
        if channel not in self.interruptive or quiet is None or quiet.start_hour == quiet.end_hour:
            return None
        local = dt.datetime.fromtimestamp(now, _zone(quiet.time_zone))
        hour = local.hour
        if quiet.start_hour < quiet.end_hour:
            inside = quiet.start_hour <= hour < quiet.end_hour
        else:  # wraps midnight, e.g. 22 -> 7
            inside = hour >= quiet.start_hour or hour < quiet.end_hour
        if not inside:
            return None
        end = local.replace(hour=quiet.end_hour, minute=0, second=0, microsecond=0)
        if end <= local:
            end += dt.timedelta(days=1)
        return end.timestamp()

    def limits(self, channel: str, profile: Profile) -> Limits:
        interruptive = channel in self.interruptive
        return Limits(
            daily=self.daily_cap,
            channel=self.channel_caps.get(channel, 0),
            user=profile.max_messages_per_day if interruptive else 0,
            gap_seconds=self.gaps.get(channel, 0.0),
            interruptive=interruptive,
        )

    def capacity(
        self,
        now: float,
        window: Window,
        limits: Limits,
        counts: Mapping[str, int],
        last_contact: float,
        channel: str,
    ) -> Capacity:
        if limits.gap_seconds and now - last_contact < limits.gap_seconds:
            return Capacity(0, last_contact + limits.gap_seconds)
        remaining = -1
        for cap, counter in (
            (limits.daily, ALL_CHANNELS),
            (limits.channel, channel),
            (limits.user, INTERRUPTIVE),
        ):
            if cap:
                left = max(0, cap - counts.get(counter_field(window, counter), 0))
                remaining = left if remaining < 0 else min(remaining, left)
        return Capacity(remaining, window.end if remaining == 0 else None)

    def under_offer_cap(self, offer: Offer, window: Window, counts: Mapping[str, int]) -> bool:
        cap = offer.max_per_user_per_day
        return not cap or counts.get(counter_field(window, ALL_CHANNELS, offer.offer_id), 0) < cap

    def cooldown_fields(self, dismissed: Offer) -> list[str]:
        """What a DISMISS puts on cooldown: the offer (``o:<id>``) and, if configured, its
        topics (``t:<topic>``)."""
        fields = [f"o:{dismissed.offer_id}"]
        if self.cools_topics:
            fields += [f"t:{topic}" for topic in dismissed.topics]
        return fields


# Check-and-consume, atomically, for one user. Counters live in the user's contacts hash:
#   "<day>|*|"  every channel   "<day>|!|"  interruptive channels   "<day>|<ch>|"  one channel
#   "<day>|*|<offer>"  one offer, every channel   "<day>|<ch>|<offer>"  one offer on one channel
#   "last|<ch>"  when the channel was last used (for minimum gaps)
#   "spent"  the last decision that consumed, and what: "<decision_id>\n<offer>\n<offer>..."
#   "last|~day"  the mark: the day every counter of the hash belongs to (``DAY_MARK``), kept
#                by this script; absent while a counter of a day not yet begun (by this
#                server's clock: another one's may be ahead) is in the hash
# Fields of other days go first, when the mark is not the caller's day (a new day, a change of
# time zone, or a hash from before the mark was kept): a field of a day that overlaps today
# (another zone's, see ``carried_over``: same rule, the script is the authority) is added to
# today's field of the same channel and offer; a field of a day past is dropped. Every field
# of the hash is looked at, not only those the caller read, so a Decide that read the profile
# before a change of zone still counts what a Decide made after it folded into the new
# zone's day. Only then: on other calls the hash holds today's counters alone, and scanning
# it (a field per offer served today) would cost Redis time on every Decide.
# KEYS[1] contacts hash; KEYS[2] profile hash: the customer's own cap is read here, inside the
# script, so a SetPreferences racing with Decides is honoured at once; KEYS[3] the user's
# request ids hash (request_id -> "<decision_id>|<time>").
# ARGV: day, now, channel, daily cap, channel cap, interruptive (1/0), gap seconds,
#       counter TTL, slots wanted, decision id, request id ('' for none), request id TTL,
#       n stale fields (other fields to drop: "last|<channel>" of long ago), stale fields...,
#       then (offer_id, offer cap) pairs in the policy's
#       order: the best-ranked offer wins the last unit of a cap.
# Returns {'+', offers consumed...} (no offer when a cap or the gap left nothing), or
# {'!', decision_id} when the request id already belongs to another decision made within its
# TTL: a concurrent Decide with the same request id won, and nothing is counted for this one.
# Idempotent per decision: the same decision's write sent again (a retried round trip whose
# reply was lost) gets the answer it got the first time, and counts nothing twice.
CONSUME_CONTACTS_LUA = """
local CARRY_SECONDS, DAY_MARK = @CARRY_SECONDS@, '@DAY_MARK@'
local day, now, channel = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local daily, chcap = tonumber(ARGV[4]), tonumber(ARGV[5])
local ucap = tonumber(redis.call('HGET', KEYS[2], 'max_per_day') or '0')
local interruptive, gap = ARGV[6] == '1', tonumber(ARGV[7])
local ttl, want = ARGV[8], tonumber(ARGV[9])
local decision, rid, rttl = ARGV[10], ARGV[11], tonumber(ARGV[12])
local n_stale = tonumber(ARGV[13])
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
    for part in string.gmatch(entry, '[^\\n]+') do parts[#parts + 1] = part end
    if parts[1] == decision then
      parts[1] = '+'
      return parts
    end
    if #kept_spends < SPENT_KEPT - 1 then kept_spends[#kept_spends + 1] = entry end
  end
end
if rid ~= '' then
  local owner = redis.call('HGET', KEYS[3], rid)
  if owner then
    local bar = string.find(owner, '|', 1, true)
    local owner_id = bar and string.sub(owner, 1, bar - 1) or owner
    local made = bar and tonumber(string.sub(owner, bar + 1)) or nil
    if owner_id ~= decision and (made == nil or now - made <= rttl) then
      return {'!', owner_id}
    end
  end
  redis.call('HSET', KEYS[3], rid, decision .. '|' .. ARGV[2])
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
for i = 14, 13 + n_stale do redis.call('HDEL', KEYS[1], ARGV[i]) end
if gap > 0 then
  local last = tonumber(redis.call('HGET', KEYS[1], 'last|' .. channel) or '0')
  if now - last < gap then return {'+'} end
end
local function count(field) return tonumber(redis.call('HGET', KEYS[1], field) or '0') end
local f_all, f_int, f_ch = day .. '|*|', day .. '|!|', day .. '|' .. channel .. '|'
local n_all, n_int, n_ch = count(f_all), count(f_int), count(f_ch)
local chosen = {'+'}
for i = 14 + n_stale, #ARGV, 2 do
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
  local entry = decision .. '\\n' .. table.concat(chosen, '\\n', 2)
  redis.call('HSET', KEYS[1], 'spent', entry .. (#kept_spends > 0 and '\t' or '')
    .. table.concat(kept_spends, '\t'))
  redis.call('EXPIRE', KEYS[1], ttl)
end
return chosen
""".replace("@CARRY_SECONDS@", str(CARRY_SECONDS)).replace("@DAY_MARK@", DAY_MARK)
