"""Storage: a small interface the core depends on, and its Redis implementation.

The hot path touches Redis at most twice per Decide: ``read_for_decision`` (profile, signals,
contact counters, cooldowns, attributes, catalog and model versions, request-id replay: one
pipelined round trip) and
``log_decision`` (decision log, contact counters, request id: one more). Writes that touch
several keys of a user run in MULTI/EXEC or in one Lua script, so they are all or nothing.

The same code runs on one Redis server or on a Redis Cluster (``connect``): every script and
every MULTI/EXEC touches one hash tag, so one slot (``keys``); only non-transactional
pipelines span slots, and ``round_trip`` picks how the Decide path sends them.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Protocol, TypeVar

import hiredis
import orjson
import redis
import redis.exceptions
from redis.backoff import NoBackoff
from redis.client import NEVER_DECODE
from redis.cluster import RedisCluster
from redis.retry import Retry

from tactful import deadline, keys, metrics, validation
from tactful.breaker import CircuitBreaker, CircuitOpen
from tactful.contact_policy import CONSUME_CONTACTS_LUA, COUNTERS_TTL_SECONDS, DAY_MARK
from tactful.domain import (
    Attribute,
    AttributeSource,
    AttributesUpdate,
    ChannelPreference,
    Consent,
    ContactCounter,
    Cooldown,
    Offer,
    PreferencesUpdate,
    Profile,
    ProfileRecord,
    QuietHours,
    Segment,
    Signal,
    Stance,
    TopicPreference,
)
from tactful.errors import (
    Abandoned,
    Aborted,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    Unavailable,
)
from tactful.settings import Settings

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: A client of one Redis server, or of a Redis Cluster (TACTFUL_REDIS_URL redis+cluster://).
Client = redis.Redis | RedisCluster

#: The "+cluster" URL scheme that names a Redis Cluster (redis-py is given the rest).
CLUSTER_SUFFIX = "+cluster"


# Errors that mean "the store is unreachable or too slow", as opposed to a bug.
STORE_DOWN_ERRORS: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.OutOfMemoryError,  # maxmemory reached: writes refused, reads still fine
    redis.exceptions.ClusterDownError,  # a cluster without a master for some slot
    redis.exceptions.SlotNotCoveredError,
    redis.exceptions.TryAgainError,  # a multi-key command during a slot migration
    OSError,
)
CATALOG_READ_ATTEMPTS = 5  # reads of the catalog before giving up on a stream of writes

# Of those, the ones that say Redis is up and answering but refuses writes (maxmemory reached,
# a replica that was promoted away): reads still work, so they must not open the breaker.
WRITE_REFUSED_ERRORS: tuple[type[Exception], ...] = (
    redis.exceptions.ReadOnlyError,
    redis.exceptions.OutOfMemoryError,
)


def write_refused(error: BaseException | None) -> bool:
    """Redis refused a write (full, or read-only), directly or inside a Lua script, where it
    comes back as a plain "Error running script ... -OOM ..." ResponseError."""
    if isinstance(error, WRITE_REFUSED_ERRORS):
        return True
    text = str(error) if isinstance(error, redis.exceptions.ResponseError) else ""
    return "OOM command not allowed" in text or "READONLY You can't write" in text


@dataclass(frozen=True, slots=True)
class DecisionInputs:
    """Everything Decide reads from the store, fetched in one round trip."""

    profile: Profile
    catalog_version: int
    model_version: int  # 0: no model published yet (the prior)
    replay_decision_id: str | None  # set when this request_id was already decided


@dataclass(frozen=True, slots=True)
class ContactSpend:
    """What the caps script needs to consume a decision's contacts (see
    ``contact_policy.CONSUME_CONTACTS_LUA`` for the meaning of each)."""

    day: str
    now: float
    channel: str
    caps: tuple[int, int]  # daily, channel; the customer's own is read by the script
    interruptive: bool
    gap_seconds: float
    slots: int
    stale: Sequence[str]  # other fields to drop ("last|<channel>" of long ago)
    ranked: Sequence[tuple[str, int]]  # (offer_id, offer's own cap), best first
    decision_id: str = ""  # what the spend is for: a resent write counts nothing twice
    request_id: str = ""  # claimed by the script: "" for none
    request_id_ttl_seconds: int = 0

    def args(self) -> list[Any]:
        out: list[Any] = [self.day, repr(self.now), self.channel, *self.caps]
        out += [int(self.interruptive), self.gap_seconds, COUNTERS_TTL_SECONDS, self.slots]
        out += [self.decision_id, self.request_id, self.request_id_ttl_seconds]
        out += [len(self.stale), *self.stale]
        for offer_id, cap in self.ranked:
            out += [offer_id, cap]
        return out


class RequestTaken(Exception):
    """A concurrent Decide with the same request id was logged first: ``decision_id`` is the
    decision that request id now stands for (this one was not logged and counted nothing)."""

    def __init__(self, decision_id: str) -> None:
        super().__init__(f"request id taken by decision {decision_id}")
        self.decision_id = decision_id


def _consumed(reply: Sequence[Any]) -> list[str]:
    """The caps script's answer: the offers it counted, or RequestTaken."""
    tag, *rest = (str(part) for part in reply)
    if tag == "!":
        raise RequestTaken(rest[0])
    return rest


@dataclass(frozen=True, slots=True)
class LoggedDecision:
    """A decision as the decision log keeps it (the x, a, p of an (x, a, r, p) tuple)."""

    decision_id: str
    payload: dict[str, Any]  # JSON-ready: the response, context, pseudonymous user, time
    # The digest of the user's keys (``keys.UserKeys.of_digest``), kept beside the record,
    # not in it: the log names its user by a keyed pseudonym only. None: not known.
    owner: str | None = None


@dataclass(frozen=True, slots=True)
class ProfileWrite:
    """What the store did with one imported profile."""

    signals_kept: bool | None  # None: the record had none; False: no consent, none kept
    attributes_refused: int  # 0, or how many attributes the user would have had (over the cap)
    # The per-user bound the line would have passed (nothing of it written): its field and
    # the bound, e.g. ("topic_preferences", 1000); None: none.
    over_bound: tuple[str, int] | None = None
    # The user was erased after the import began: nothing of the line was written (it would
    # have brought back a profile erased meanwhile).
    erased: bool = False


#: What the import script's negative answers mean: the field and its per-user bound.
_IMPORT_BOUNDS = {
    1: ("topic_preferences", validation.MAX_TOPIC_PREFERENCES_PER_USER),
    2: ("channel_preferences", validation.MAX_CHANNEL_PREFERENCES_PER_USER),
    3: ("signals", validation.MAX_SIGNAL_TOPICS_PER_USER),
}


class OutcomeStatus:
    RECORDED = 1
    DUPLICATE = 0
    UNKNOWN_DECISION = -1
    OFFER_NOT_IN_DECISION = -2


@dataclass(frozen=True, slots=True)
class RecordedOutcome:
    status: int  # an OutcomeStatus
    arm: str = ""  # the arm of the decision, as logged ("" when it is unknown)


class Store(Protocol):
    def read_for_decision(self, *, user_id: str, request_id: str) -> DecisionInputs: ...

    def log_decision(
        self,
        *,
        user_id: str,
        decision: LoggedDecision,
        request_id: str,
        learn_after: float | None,
        spend: ContactSpend | None = None,
    ) -> list[str] | None: ...

    def add_cooldowns(
        self, *, user_key: str, fields: Sequence[str], until: float, started: float | None = None
    ) -> None: ...

    def get_logged_decision(
        self, *, decision_id: str, render: bool = False
    ) -> LoggedDecision | None: ...

    def record_outcome(
        self, *, decision_id: str, offer_id: str, outcome_id: str, outcome: dict[str, Any]
    ) -> RecordedOutcome: ...

    def get_profile(self, *, user_id: str) -> Profile: ...

    def set_preferences(self, *, update: PreferencesUpdate, now: float) -> Profile: ...

    def set_attributes(self, *, update: AttributesUpdate, now: float, limit: int) -> Profile: ...

    def record_signals(
        self, *, user_id: str, signals: Sequence[Signal], now: float | None = None
    ) -> bool: ...

    def delete_profile(self, *, user_id: str, now: float | None = None) -> None: ...

    def catalog_version(self) -> int: ...

    def load_model(self, *, version: int) -> bytes | None: ...

    def load_catalog(self) -> tuple[int, list[Offer], list[Segment]]: ...

    def put_offer(self, *, offer: Offer) -> None: ...

    def get_offer(self, *, offer_id: str) -> Offer | None: ...

    def delete_offer(self, *, offer_id: str) -> bool: ...

    def put_segment(self, *, segment: Segment, limit: int) -> None: ...

    def get_segment(self, *, segment_id: str) -> Segment | None: ...

    def delete_segment(self, *, segment_id: str) -> bool: ...

    def take_token(self, *, bucket: str, rate: float, burst: float) -> float: ...


# The erasure fence, opening every script that writes a user's keys: the script is given the
# slot's fence zset as its LAST key and (user digest, time its call started) as its FIRST two
# ARGV, takes them off, and answers 'erased' without writing anything when the user was erased
# at or after that time (``_ERASE_USER_LUA``): a call that was in flight during an erasure
# cannot re-create what it deleted. What follows it reads its KEYS and ARGV as if they were
# never there.
_FENCE_LUA = """
local FENCE = table.remove(KEYS)
local FENCE_DIGEST = table.remove(ARGV, 1)
local FENCE_STARTED = tonumber(table.remove(ARGV, 1))
local ERASED_AT = redis.call('ZSCORE', FENCE, FENCE_DIGEST)
if ERASED_AT and tonumber(ERASED_AT) >= FENCE_STARTED then return 'erased' end
"""
#: What a fenced script answers when the user was erased while its call was in flight.
ERASED = "erased"

# Erasure, the user's slot part, atomically: the user goes on the fence (ARGV[1] digest at
# ARGV[2], the fence of the slot kept ARGV[3] seconds), every key of the user but the decision
# indexes is deleted, and the decision ids of those indexes are returned (the caller deletes
# those decisions, in their own slots, and then takes them off the indexes: an erasure retried
# after a failure in between finds them again). KEYS fence, then the user's keys, the two
# decision indexes (old set, zset) last.
_ERASE_USER_LUA = """
local at, keep = tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], at, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (at - keep))
redis.call('EXPIRE', KEYS[1], math.ceil(keep))
local ids = redis.call('SMEMBERS', KEYS[#KEYS - 1])
for _, id in ipairs(redis.call('ZRANGE', KEYS[#KEYS], 0, -1)) do ids[#ids + 1] = id end
redis.call('DEL', unpack(KEYS, 2, #KEYS - 2))
return ids
"""

# A logged decision, the user's slot part (fenced): the decision goes on the user's index,
# which forgets decisions past their TTL; the oldest beyond ARGV[4] are returned, for the
# caller to delete and then take off the index (so it always reaches every decision kept); with a
# request id, it goes on the request-id index likewise (past its TTL or beyond ARGV[8], the
# oldest request ids are forgotten), and is claimed here when ARGV[6] is '1' (no caps script
# claimed it): first come first served, as the caps script does. KEYS decided zset, requests
# hash, requested zset; ARGV decision_id, made at, decision TTL, most decisions, request id
# ('' none), claim ('1'/'0'), request-id TTL, most request ids. Returns {'+', dropped...} or
# {'!', the decision the request id stands for}.
_LOG_DECISION_LUA = """
local id, now, ttl, most = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local rid, rttl, rmost = ARGV[5], tonumber(ARGV[7]), tonumber(ARGV[8])
if rid ~= '' then
  if ARGV[6] == '1' then
    local owner = redis.call('HGET', KEYS[2], rid)
    if owner then
      local bar = string.find(owner, '|', 1, true)
      local owner_id = bar and string.sub(owner, 1, bar - 1) or owner
      local made = bar and tonumber(string.sub(owner, bar + 1)) or nil
      if owner_id ~= id and (made == nil or now - made <= rttl) then return {'!', owner_id} end
    end
    redis.call('HSET', KEYS[2], rid, id .. '|' .. ARGV[2])
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
"""

# A DISMISS's cooldowns (fenced). KEYS cooldowns hash; ARGV until, then the fields.
_ADD_COOLDOWNS_LUA = """
for i = 2, #ARGV do redis.call('HSET', KEYS[1], ARGV[i], ARGV[1]) end
-- Every cooldown lasts the same time, so the newest ends last: the key goes with it.
redis.call('EXPIREAT', KEYS[1], math.floor(tonumber(ARGV[1])) + 1)
return 1
"""

# Adds inferred signals, decaying what is stored to the new observation's time, atomically,
# and only for a user who consented to the use of their behaviour (returns 0 otherwise: the
# signals are not kept at all). KEYS[1] signals hash, KEYS[2] profile hash; ARGV[1] half-life
# seconds (0: replace, see below), ARGV[2] the most topics a user may have signals of; then
# (topic, weight, observed_at) triples. Returns 1 (kept), 0 (no consent), or minus the count of
# topics the call would have left when that is over the cap (nothing written).
# RecordSignals adds observations, so sending the same ones twice counts them twice. A bulk
# import sends a signal's *state* (its weight at observed_at, as GetProfile and the export
# show it) with half-life 0: the stored value of the topic is replaced, not added to, so
# importing a file again leaves the same state; the consent rule is the same.
_RECORD_SIGNALS_LUA = """
local consent = redis.call('HGET', KEYS[2], 'consent')
if not consent or string.sub(consent, 1, 1) ~= '1' then return 0 end
local half_life, cap = tonumber(ARGV[1]), tonumber(ARGV[2])
local count = redis.call('HLEN', KEYS[1])
local seen = {}
for i = 3, #ARGV, 3 do
  if not seen[ARGV[i]] and redis.call('HEXISTS', KEYS[1], ARGV[i]) == 0 then count = count + 1 end
  seen[ARGV[i]] = true
end
if count > cap then return -count end
for i = 3, #ARGV, 3 do
  local topic, w, t = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local old = false
  if half_life > 0 then old = redis.call('HGET', KEYS[1], topic) end
  if old then
    local sep = string.find(old, '|', 1, true)
    local w0, t0 = tonumber(string.sub(old, 1, sep - 1)), tonumber(string.sub(old, sep + 1))
    if t >= t0 then
      w = w0 * (0.5 ^ ((t - t0) / half_life)) + w
    else
      w = w0 + w * (0.5 ^ ((t0 - t) / half_life))
      t = t0
    end
  end
  redis.call('HSET', KEYS[1], topic, string.format('%.17g|%.6f', w, t))
end
return 1
"""

# SetPreferences, atomically: the stances to clear and to set, the signals deleted if consent
# is withdrawn, and the whole profile returned as it is right after. A user holds at most
# ARGV[1] topic stances and ARGV[2] channel choices: a call that would leave more changes
# nothing and returns {0, kind ('t' or 'c'), count}. KEYS profile, signals, contacts,
# cooldowns, attributes hashes; ARGV the two caps, withdrawn (1/0), number of fields to clear,
# those fields, then (field, value) pairs to set.
_SET_PREFERENCES_LUA = """
local n_clear = tonumber(ARGV[4])
local first_set = 5 + n_clear
local new = {t = 0, c = 0}
for i = first_set, #ARGV, 2 do
  local kind = string.sub(ARGV[i], 1, 2)
  if (kind == 't:' or kind == 'c:') and redis.call('HEXISTS', KEYS[1], ARGV[i]) == 0 then
    new[string.sub(kind, 1, 1)] = new[string.sub(kind, 1, 1)] + 1
  end
end
if new.t + new.c > 0 then
  local held = {t = 0, c = 0}
  for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
    local kind = string.sub(field, 1, 2)
    if kind == 't:' or kind == 'c:' then
      held[string.sub(kind, 1, 1)] = held[string.sub(kind, 1, 1)] + 1
    end
  end
  local cleared = {t = 0, c = 0}
  for i = 5, first_set - 1 do
    local kind = string.sub(ARGV[i], 1, 1)
    if cleared[kind] and redis.call('HEXISTS', KEYS[1], ARGV[i]) == 1 then
      cleared[kind] = cleared[kind] + 1
    end
  end
  for kind, cap in pairs({t = tonumber(ARGV[1]), c = tonumber(ARGV[2])}) do
    local count = held[kind] - cleared[kind] + new[kind]
    if new[kind] > 0 and count > cap then return {0, kind, count} end
  end
end
if n_clear > 0 then redis.call('HDEL', KEYS[1], unpack(ARGV, 5, first_set - 1)) end
if first_set <= #ARGV then redis.call('HSET', KEYS[1], unpack(ARGV, first_set, #ARGV)) end
if ARGV[3] == '1' then redis.call('DEL', KEYS[2]) end
return {1, redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2]),
  redis.call('HGETALL', KEYS[3]), redis.call('HGETALL', KEYS[4]), redis.call('HGETALL', KEYS[5])}
"""

# Merges attributes, all from one source, atomically, and returns the whole profile as it is
# right after (one script in the user's slot). Each is stored as "source|updated_at|value"
# (the value last: it may hold '|'). What the customer stated outranks a system of record: an
# IMPORTED value (setting or, empty, removing) leaves a STATED one alone; a STATED value
# replaces anything. The user's cap is checked before anything is written: a call that would
# leave more than ARGV[3] attributes changes nothing and returns {0, that count}.
# The user id goes in the profile hash with them (field user_id), so an export can name the
# user (keys only hold a digest of it).
# KEYS attributes, profile and, to have the profile returned (else just {1}), signals,
# contacts, cooldowns hashes; ARGV source (1 STATED, 2 IMPORTED), now, cap, user id, then
# (name, value) pairs (an empty value removes).
# The merge itself, shared with the bulk import's script (``_IMPORT_PROFILE_LUA``): the
# (name, value) pairs ARGV[first..last] into the attributes hash ``key``, from ``source``
# ('1' STATED, '2' IMPORTED) at ``at``; returns 0 and the count it would leave if over
# ``cap`` (nothing written), else 1.
_MERGE_ATTRIBUTES_LUA = """
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
"""

_SET_ATTRIBUTES_LUA = (
    _MERGE_ATTRIBUTES_LUA
    + """
local ok, count = merge_attributes(KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3]), 5, #ARGV)
if ok == 0 then return {0, count} end
redis.call('HSET', KEYS[2], 'user_id', ARGV[4])
if #KEYS < 5 then return {1} end
return {1, redis.call('HGETALL', KEYS[2]), redis.call('HGETALL', KEYS[3]),
  redis.call('HGETALL', KEYS[4]), redis.call('HGETALL', KEYS[5]), redis.call('HGETALL', KEYS[1])}
"""
)

# One imported profile, everything ``write_profiles`` used to send as separate commands, in
# the same order and with the same effects, as ONE script in the user's slot: a batch is one
# command and one small reply per user (the separate commands cost the importer more to pack
# and parse than Redis spent running them). In order: the profile hash's fields cleared
# (NEUTRAL stances) and set (user id, stances, opt-ins, limits, consent: as SetPreferences
# writes them), the signals deleted if consent is withdrawn, each group of attributes merged
# by SetAttributes' own merge (one group per source and time; if a group would pass the cap,
# nothing of the line is written: the attributes are merged first and put back), then the
# signals as RecordSignals' script
# writes them in its replacing mode (half-life 0: each replaces its topic's state), only if
# the profile, as now written, holds consent.
# KEYS profile, attributes, signals hashes; ARGV cap, withdrawn (1/0), number of
# fields to clear, number of (field, value) pairs to set, those fields, those pairs, number
# of attribute groups, each group as source, time, number of pairs, (name, value) pairs;
# then (topic, weight, observed_at) triples to the end.
# Returns refused * 3 + signals, refused the most attributes a refused group would have
# left (0: none refused) and signals 0 (none given), 1 (not kept: no consent) or 2 (kept).
_IMPORT_PROFILE_LUA = (
    _MERGE_ATTRIBUTES_LUA
    + """
local cap = tonumber(ARGV[1])
local n_clear, n_set = tonumber(ARGV[3]), tonumber(ARGV[4])
local profile_at = 8
local i = profile_at + n_clear + 2 * n_set
-- The per-user bounds of SetPreferences and RecordSignals (ARGV[5..7]: topic stances, channel
-- choices, signal topics), before anything is written: a line that would pass one is refused
-- whole, answering -1, -2 or -3.
do
  local new = {t = 0, c = 0}
  for j = profile_at + n_clear, i - 1, 2 do
    local kind = string.sub(ARGV[j], 1, 1)
    if new[kind] and string.sub(ARGV[j], 2, 2) == ':'
        and redis.call('HEXISTS', KEYS[1], ARGV[j]) == 0 then
      new[kind] = new[kind] + 1
    end
  end
  if new.t + new.c > 0 then
    local held = {t = 0, c = 0}
    for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
      local kind = string.sub(field, 1, 1)
      if held[kind] and string.sub(field, 2, 2) == ':' then held[kind] = held[kind] + 1 end
    end
    for j = profile_at, profile_at + n_clear - 1 do
      local kind = string.sub(ARGV[j], 1, 1)
      if held[kind] and redis.call('HEXISTS', KEYS[1], ARGV[j]) == 1 then
        held[kind] = held[kind] - 1
      end
    end
    if new.t > 0 and held.t + new.t > tonumber(ARGV[5]) then return -1 end
    if new.c > 0 and held.c + new.c > tonumber(ARGV[6]) then return -2 end
  end
  local j = i + 1
  for _ = 1, tonumber(ARGV[i]) do j = j + 3 + 2 * tonumber(ARGV[j + 2]) end
  if j <= #ARGV then
    local count = 0
    if ARGV[2] ~= '1' then count = redis.call('HLEN', KEYS[3]) end
    local seen = {}
    for k = j, #ARGV, 3 do
      if not seen[ARGV[k]]
          and (ARGV[2] == '1' or redis.call('HEXISTS', KEYS[3], ARGV[k]) == 0) then
        count = count + 1
      end
      seen[ARGV[k]] = true
    end
    if count > tonumber(ARGV[7]) then return -3 end
  end
end
-- The attributes first: a line whose attributes would pass the cap is refused whole, so
-- they are merged before anything else is written, and put back as they were if a group is
-- refused (a script runs atomically: nobody sees the attributes in between).
local before = nil
local refused = 0
local groups = tonumber(ARGV[i])
i = i + 1
for _ = 1, groups do
  local source, at, n_pairs = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  i = i + 3
  if groups > 1 and before == nil then before = redis.call('HGETALL', KEYS[2]) end
  local ok, count = merge_attributes(KEYS[2], source, at, cap, i, i + 2 * n_pairs - 1)
  if ok == 0 and count > refused then refused = count end
  i = i + 2 * n_pairs
end
if refused > 0 then
  if before ~= nil then
    redis.call('DEL', KEYS[2])
    if #before > 0 then redis.call('HSET', KEYS[2], unpack(before)) end
  end
  return refused * 3
end
-- (SetAttributes' HSET of the user id is not repeated: the profile's, below, sets it.)
if n_clear > 0 then
  redis.call('HDEL', KEYS[1], unpack(ARGV, profile_at, profile_at + n_clear - 1))
end
if n_set > 0 then
  local first = profile_at + n_clear
  redis.call('HSET', KEYS[1], unpack(ARGV, first, first + 2 * n_set - 1))
end
if ARGV[2] == '1' then redis.call('DEL', KEYS[3]) end
if i > #ARGV then return 0 end
local consent = redis.call('HGET', KEYS[1], 'consent')
if not consent or string.sub(consent, 1, 1) ~= '1' then return refused * 3 + 1 end
for j = i, #ARGV, 3 do
  local w, t = tonumber(ARGV[j + 1]), tonumber(ARGV[j + 2])
  redis.call('HSET', KEYS[3], ARGV[j], string.format('%.17g|%.6f', w, t))
end
return refused * 3 + 2
"""
)

# The catalog's writes that check offers against segments, each one script in the {catalog}
# slot, so no check can be overtaken by a concurrent write (a PutOffer naming a segment while
# a DeleteSegment removes it: one of them sees the other's result). Scripts rather than
# WATCH/MULTI: a WATCH on the offers hash would make a DeleteSegment retry whenever any offer
# changes, and each script is short.
#
# Puts an offer if every segment it names exists. KEYS offers, segments, version; ARGV
# offer_id, offer JSON, then the segment ids. Returns the ids that do not exist (nothing
# written), or an empty list when the offer was put.
_PUT_OFFER_LUA = """
local missing = {}
for i = 3, #ARGV do
  if redis.call('HEXISTS', KEYS[2], ARGV[i]) == 0 then missing[#missing + 1] = ARGV[i] end
end
if #missing > 0 then return missing end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('INCR', KEYS[3])
return missing
"""

# Puts a segment unless it is new and the catalog already holds ARGV[3] of them. KEYS
# segments, version; ARGV segment_id, segment JSON, cap. Returns 1 if put, 0 if full.
_PUT_SEGMENT_LUA = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0
    and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('INCR', KEYS[2])
return 1
"""

# Deletes a segment no offer names. KEYS segments, offers, version; ARGV segment_id.
# Returns {1} deleted, {0} no such segment, or {-1, offer_id...}: the offers that name it
# (nothing deleted). Every offer is looked at: a DeleteSegment is a rare admin call on a
# catalog small enough for every process to hold in memory, and a scan needs no reverse
# index that could drift from the offers. A plain text search skips the JSON decoding of
# offers that cannot name it (ids are plain ASCII without quotes: JSON writes them as is).
_DELETE_SEGMENT_LUA = """
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
"""

# An outcome and its reward touch two slots: the decision's ({d:<id>}) and the reward stream's
# ({model}). No script may span both on Redis Cluster, so it takes two, each atomic in its slot,
# and the second is idempotent: a client that retries after a failure between them (the same
# outcome_id) sends what the first attempt did not, never twice.

# Stores an outcome once per outcome_id, only for a logged decision that chose the offer.
# KEYS decision record, outcomes hash; ARGV offer_id, outcome_id, outcome JSON.
# Returns {status, record, arm}: the record (for its feature vector) when the offer has one,
# and the decision's arm (for the metrics); {status, false} when there is no such decision or
# the offer was not chosen in it.
_RECORD_OUTCOME_LUA = """
local record = redis.call('GET', KEYS[1])
if not record then return {-1, false} end
local decision = cjson.decode(record)
local chosen = false
for _, id in ipairs(decision['offer_ids']) do if id == ARGV[1] then chosen = true end end
if not chosen then return {-2, false} end
local status = redis.call('HSETNX', KEYS[2], ARGV[2], ARGV[3])
-- The very same outcome (same JSON, same time) already there: a retried attempt of the
-- call that stored it, which must get that call's answer.
if status == 0 and redis.call('HGET', KEYS[2], ARGV[2]) == ARGV[3] then status = 1 end
if status == 1 then
  local ttl = redis.call('TTL', KEYS[1])
  if ttl > 0 then redis.call('EXPIRE', KEYS[2], ttl) end
end
local arm = decision['arm']
if type(arm) ~= 'string' then arm = '' end
local features = decision['features']
if type(features) == 'table' and features[ARGV[1]] then return {status, record, arm} end
return {status, false, arm}
"""

# Sends an offer's reward to the learner: the first one for the offer, while the decision's
# reward window is open (its decision_id still in the awaiting zset). KEYS awaiting zset,
# learned hash, reward stream; ARGV decision_id, offer_id, reward, feature vector JSON, now.
_SEND_REWARD_LUA = """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
local sent = redis.call('HGET', KEYS[2], ARGV[1])
local offers = {}
if sent then offers = cjson.decode(sent) end
for _, id in ipairs(offers) do if id == ARGV[2] then return 0 end end
offers[#offers + 1] = ARGV[2]
redis.call('HSET', KEYS[2], ARGV[1], cjson.encode(offers))
redis.call('XADD', KEYS[3], '*', 'd', ARGV[1], 'o', ARGV[2], 'r', ARGV[3], 'x', ARGV[4],
  't', ARGV[5])
return 1
"""

# Closes reward windows: for each decision still awaiting, every chosen offer whose reward was
# not sent goes to the learner with reward 0 (the default reward), and the decision's window
# bookkeeping goes. A decision already closed is skipped, so a retry sends nothing twice.
# KEYS awaiting zset, learned hash, reward stream; ARGV now, then per decision: decision_id,
# n, and n (offer_id, feature vector JSON) pairs (the decision log is in other slots: the
# caller reads it first).
# Publishes a model version unless a rollback pinned one, and drops the versions beyond the
# newest ``keep``, in one atomic step: a rollback (below) lands either before it (then nothing
# is published) or after it (then it wins), never in between, and never loses its version.
# KEYS[1] pinned, KEYS[2] versions zset, KEYS[3] current, KEYS[4] the new snapshot; ARGV:
# version, snapshot bytes, published at, keep, snapshot key prefix. Returns 1, or 0 if pinned.
_PUBLISH_MODEL_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[4], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('SET', KEYS[3], ARGV[1])
for _, old in ipairs(redis.call('ZRANGE', KEYS[2], 0, -(tonumber(ARGV[4]) + 1))) do
  redis.call('DEL', ARGV[5] .. old)
  redis.call('ZREM', KEYS[2], old)
end
return 1
"""

# Serves a kept version again and pins it, if it is still kept. KEYS[1] the snapshot,
# KEYS[2] current, KEYS[3] pinned; ARGV[1] the version. Returns 1, or 0 if it is gone.
_ROLLBACK_MODEL_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('SET', KEYS[2], ARGV[1])
redis.call('SET', KEYS[3], ARGV[1])
return 1
"""

_CLOSE_WINDOWS_LUA = """
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
"""


# Renews (or, with ttl 1, lets go of) the learner lease if this token holds it.
# A token bucket: takes one token if there is one. KEYS[1] the bucket hash; ARGV[1] tokens
# per second, ARGV[2] bucket size. Time is Redis's own (TIME), so every server process and
# pod agrees on it. Returns "0" when a token was taken, else the seconds until one will be
# there (as a string: Lua numbers would come back truncated to integers).
_TAKE_TOKEN_LUA = """
redis.replicate_commands()
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return tostring(wait)
"""


_RENEW_LEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


class NotSent(redis.exceptions.ConnectionError):
    """No connection to Redis could be made: the command was never sent, so even a call
    that must not run twice can be tried again."""


#: ``time.monotonic()`` by which the store attempt in progress must have its reply (a
#: ``ContextVar``: each serving thread has its own); None: the client's own socket timeout.
_ATTEMPT_DEADLINE: ContextVar[float | None] = ContextVar("tactful_attempt_deadline", default=None)
#: The least time an attempt is given: a socket timeout of 0 would mean "non-blocking".
_MIN_ATTEMPT_SECONDS = 0.0005


class _Budgeted:
    """Mixed into a redis-py connection class: its socket timeout is the current attempt's
    budget (what is left until ``_ATTEMPT_DEADLINE``), set on every send, so one pool serves
    calls with different budgets: a render-time read, a write that may wait a second. A
    failure to connect is ``NotSent``."""

    _sock: Any
    socket_timeout: float | None

    def connect_check_health(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().connect_check_health(*args, **kwargs)  # type: ignore[misc]
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise NotSent(str(exc)) from exc

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if not self._sock:
            self.connect_check_health(check_health=False)
        if self._sock is not None:
            deadline = _ATTEMPT_DEADLINE.get()
            if deadline is None:
                self._sock.settimeout(self.socket_timeout)
            else:
                self._sock.settimeout(max(_MIN_ATTEMPT_SECONDS, deadline - time.monotonic()))
        super().send_packed_command(command, check_health)  # type: ignore[misc]


class _BudgetedConnection(_Budgeted, redis.Connection):
    pass


class _BudgetedUnixConnection(_Budgeted, redis.UnixDomainSocketConnection):
    pass


class _BudgetedSSLConnection(_Budgeted, redis.SSLConnection):
    pass


_CONNECTION_CLASSES = {
    "unix": _BudgetedUnixConnection,
    "rediss": _BudgetedSSLConnection,
    "redis": _BudgetedConnection,
}


@dataclass(frozen=True, slots=True)
class Budget:
    """How long one store operation may wait for Redis, retries included: ``seconds``, or
    what is left of the call's deadline, less a margin to answer without the store (a
    fallback, an error), if that is sooner."""

    seconds: float

    def deadline(self) -> float:
        return _within_call(time.monotonic(), self.seconds)

    def observe(self, seconds: float) -> None:
        """An attempt succeeded in ``seconds`` (only an adaptive budget learns from it)."""


def _within_call(now: float, seconds: float, share: float = 1.0) -> float:
    """``now + seconds``, or sooner: ``share`` of what is left of the call's deadline, less
    a margin to answer without the store (a fallback, an error)."""
    at = now + seconds
    left = deadline.seconds_left()
    if left is not None:
        margin = max(DEADLINE_MARGIN_SECONDS, DEADLINE_MARGIN_SHARE * left)
        at = min(at, now + min(share * left, left - margin))
    return max(at, now + _MIN_ATTEMPT_SECONDS)


class RenderBudget:
    """The budget of Decide's read: tight, so a store that does not answer still leaves time
    for a fast fallback, yet not tighter than this machine's Redis round trips are now.

    At least ``floor`` (TACTFUL_REDIS_SOCKET_TIMEOUT_MS). Like TCP's retransmission timeout,
    it follows the round trips it sees: ``RENDER_P99_FACTOR`` times the 99th percentile of the
    last ``RENDER_SAMPLES`` successful reads, up to ``ceiling``
    (TACTFUL_REDIS_RENDER_TIMEOUT_MAX_MS) and to half of what is left of the call's deadline.
    On a quiet machine (round trips well under a millisecond) it is the floor, and a frozen
    Redis costs a Decide that much; on a machine so loaded that Redis itself waits for a CPU,
    a read that would have answered in 20 ms is waited for rather than turned into a
    fallback. Only successes are sampled: a Redis that stopped answering does not stretch it."""

    def __init__(self, floor: float, ceiling: float) -> None:
        self.floor = floor
        self.ceiling = max(floor, ceiling)
        self.seconds = floor
        self._samples: list[float] = []
        self._next = 0
        self._lock = threading.Lock()

    def deadline(self) -> float:
        return _within_call(time.monotonic(), self.seconds, share=RENDER_DEADLINE_SHARE)

    def observe(self, seconds: float) -> None:
        with self._lock:
            if len(self._samples) < RENDER_SAMPLES:
                self._samples.append(seconds)
            else:
                self._samples[self._next] = seconds
            self._next = (self._next + 1) % RENDER_SAMPLES
            if self._next % RENDER_REFRESH_EVERY:
                return
            ordered = sorted(self._samples)
        p99 = ordered[int(0.99 * (len(ordered) - 1))]
        self.seconds = min(self.ceiling, max(self.floor, RENDER_P99_FACTOR * p99))


#: The render budget (``RenderBudget``): how many recent reads it follows, how often it looks
#: again, how many times their 99th percentile it allows, and at most what share of the call's
#: deadline.
RENDER_SAMPLES = 512
RENDER_REFRESH_EVERY = 32
RENDER_P99_FACTOR = 4.0
RENDER_DEADLINE_SHARE = 0.5
#: What a call keeps of its deadline to answer once the store has failed it: this share of what
#: is left, and at least this long (an answer still has to be built, and the machine may be busy).
DEADLINE_MARGIN_SHARE = 0.1
DEADLINE_MARGIN_SECONDS = 0.002
#: What one user's decision index holds at most: a user id shared by many visitors (say
#: ``guest``) keeps its newest decisions joinable and erasable within one call, and drops the
#: oldest. Likewise the request ids that replay a Decide.
MAX_DECISIONS_PER_USER = 10_000
MAX_REQUEST_IDS_PER_USER = 10_000
#: How long an erased user stays on the erasure fence (``_FENCE_LUA``): longer than any call
#: that was in flight during the erasure can still be writing.
ERASURE_FENCE_SECONDS = 300.0

#: Waits between attempts of an idempotent operation: the first, doubled each time.
RETRY_FIRST_WAIT_SECONDS = 0.002
RETRY_MAX_WAIT_SECONDS = 0.05
#: Errors after which an idempotent operation is tried again (within its budget).
RETRYABLE_ERRORS: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,  # NotSent and BusyLoadingError among them
    redis.exceptions.TimeoutError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
    OSError,
)


def connect(
    url: str,
    *,
    socket_timeout: float,
    connect_timeout: float,
    max_connections: int,
    retries: int = 1,
    **options: Any,
) -> Client:
    """A client whose commands time out after ``socket_timeout``, or after the budget a
    ``RedisStore`` operation sets for its attempt (``_BudgetedConnection``). redis-py itself
    retries a command ``retries`` times on a broken connection (a timeout is never retried
    by it); the server's store passes 0 and retries by itself, knowing which operations are
    idempotent and how long each may wait.

    ``redis+cluster://host:port`` (or ``rediss+cluster://``) names a Redis Cluster by any
    one of its nodes: redis-py's ``RedisCluster`` finds the others and routes each command
    by its key's slot (following MOVED and ASK), with the same timeouts, ``max_connections``
    per node, and ``retries`` retries of its own (after refreshing its slot map), which cover
    timeouts too: the server's store passes 0, so nothing that must not run twice is sent
    again behind its back."""
    scheme, _, rest = url.partition("://")
    base_scheme = scheme.removesuffix(CLUSTER_SUFFIX)
    connection_class = options.pop("connection_class", None)
    if connection_class is None:
        connection_class = _CONNECTION_CLASSES.get(base_scheme, _BudgetedConnection)
    elif not issubclass(connection_class, _Budgeted):  # a caller's own (tests observe trips)
        connection_class = type(connection_class.__name__, (_Budgeted, connection_class), {})
    common: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "max_connections": max_connections,
        "health_check_interval": 0,
        "connection_class": connection_class,
    }
    if scheme.endswith(CLUSTER_SUFFIX):
        return RedisCluster.from_url(
            f"{base_scheme}://{rest}",
            retry=Retry(NoBackoff(), retries),
            **common,
            **options,
        )
    return redis.Redis.from_url(
        url,
        retry=Retry(NoBackoff(), retries, supported_errors=(redis.exceptions.ConnectionError,)),
        retry_on_error=[redis.exceptions.ConnectionError] if retries else [],
        **common,
        **options,
    )


class RedisStore:
    """The store on Redis. Every operation runs through ``_run``: behind the circuit breaker,
    within its budget (``render`` for what a page waits for, ``write`` for the rest; both
    bounded by the call's deadline), tried again on a timeout or a dropped connection while
    its budget lasts if it is idempotent, and turned into ``Unavailable`` when Redis cannot
    be reached."""

    def __init__(
        self,
        client: Client,
        *,
        signal_half_life_seconds: float,
        decision_ttl_seconds: int,
        request_id_ttl_seconds: int,
        breaker: CircuitBreaker | None = None,
        render_budget_seconds: float = 0.01,
        render_budget_max_seconds: float = 0.05,
        write_budget_seconds: float = 1.0,
    ) -> None:
        self.client = client
        # No breaker given: one that never opens (tools and tests that want every error).
        self.breaker = breaker or CircuitBreaker.never()
        self.render: Budget | RenderBudget = RenderBudget(
            render_budget_seconds, render_budget_max_seconds
        )
        self.write = Budget(write_budget_seconds)
        self._half_life = signal_half_life_seconds
        self._decision_ttl = decision_ttl_seconds
        self._request_ttl = request_id_ttl_seconds
        # Every script that writes a user's keys opens with the erasure fence.
        self._record_signals = client.register_script(_FENCE_LUA + _RECORD_SIGNALS_LUA)
        self._set_preferences = client.register_script(_FENCE_LUA + _SET_PREFERENCES_LUA)
        self._set_attributes = client.register_script(_FENCE_LUA + _SET_ATTRIBUTES_LUA)
        self._log_decision = client.register_script(_FENCE_LUA + _LOG_DECISION_LUA)
        self._add_cooldowns = client.register_script(_FENCE_LUA + _ADD_COOLDOWNS_LUA)
        self._erase_user = client.register_script(_ERASE_USER_LUA)
        self._import_profile = client.register_script(_FENCE_LUA + _IMPORT_PROFILE_LUA)
        self._record_outcome = client.register_script(_RECORD_OUTCOME_LUA)
        self._send_reward = client.register_script(_SEND_REWARD_LUA)
        self._consume_contacts = client.register_script(_FENCE_LUA + CONSUME_CONTACTS_LUA)
        self._take_token = client.register_script(_TAKE_TOKEN_LUA)
        self._put_offer = client.register_script(_PUT_OFFER_LUA)
        self._put_segment = client.register_script(_PUT_SEGMENT_LUA)
        self._delete_segment = client.register_script(_DELETE_SEGMENT_LUA)
        self._round_trip = round_trip(client)
        self._cluster = isinstance(client, RedisCluster)

    @classmethod
    def for_settings(
        cls,
        client: Client,
        settings: Settings,
        *,
        breaker: bool = True,
        write_budget_seconds: float | None = None,
    ) -> RedisStore:
        """The store as the settings describe it; ``breaker=False`` for tools that want to
        see every error (bulk commands), not a circuit that opened, and may wait longer
        (``write_budget_seconds``)."""
        redis_settings = settings.redis
        return cls(
            client,
            signal_half_life_seconds=settings.policy.signal_half_life_hours * 3600,
            decision_ttl_seconds=settings.policy.decision_ttl_seconds,
            request_id_ttl_seconds=settings.policy.request_id_ttl_seconds,
            breaker=CircuitBreaker(
                failure_rate=redis_settings.breaker_failure_rate,
                min_calls=redis_settings.breaker_min_calls,
                window_seconds=redis_settings.breaker_window_seconds,
                open_seconds=redis_settings.breaker_open_seconds,
            )
            if breaker
            else None,
            render_budget_seconds=redis_settings.socket_timeout_ms / 1000,
            render_budget_max_seconds=redis_settings.render_timeout_max_ms / 1000,
            write_budget_seconds=write_budget_seconds or redis_settings.write_timeout_ms / 1000,
        )

    def _run(
        self,
        operation: str,
        attempt: Callable[[], _T],
        *,
        budget: Budget | RenderBudget,
        idempotent: bool = True,
    ) -> _T:
        """``attempt()`` behind the circuit breaker and within ``budget``: while the circuit
        is open the store is not asked at all. A timeout or a dropped connection is tried
        again while the budget lasts if the operation is idempotent (whatever it is, if the
        connection could not even be made: nothing was sent). What is still failing then is
        ``Unavailable`` (counted); a bug or a script error goes through as it is."""
        left = deadline.seconds_left()
        if left is not None and left <= 0:
            # The caller is gone: nothing is sent for it (a write now would be one it cannot
            # know about, and one that may run after what it does next).
            raise Abandoned("the caller's deadline passed: nothing was sent to the store")
        try:
            probe = self.breaker.before_call()
        except CircuitOpen:
            metrics.redis_errors(operation).inc()
            raise Unavailable("store unavailable: circuit open") from None
        start = time.perf_counter()
        until = budget.deadline()
        wait = RETRY_FIRST_WAIT_SECONDS
        try:
            while True:
                token = _ATTEMPT_DEADLINE.set(until)
                sent = time.perf_counter()
                try:
                    result = attempt()
                except STORE_DOWN_ERRORS as exc:
                    if write_refused(exc):
                        raise self._refused(operation, probe) from exc
                    retry = isinstance(exc, NotSent) or (
                        idempotent and isinstance(exc, RETRYABLE_ERRORS)
                    )
                    if retry and time.monotonic() + wait + _MIN_ATTEMPT_SECONDS < until:
                        metrics.redis_retries(operation).inc()
                        time.sleep(wait)
                        wait = min(wait * 2, RETRY_MAX_WAIT_SECONDS)
                        continue
                    self.breaker.failed(probe=probe, conclusive=_refused(exc))
                    metrics.redis_errors(operation).inc()
                    raise Unavailable(f"store unavailable: {type(exc).__name__}") from exc
                except redis.exceptions.ResponseError as exc:
                    if write_refused(exc):
                        raise self._refused(operation, probe) from exc
                    # The store answered; the error is not its health.
                    self.breaker.succeeded(probe=probe)
                    raise
                except BaseException:
                    self.breaker.succeeded(probe=probe)
                    raise
                finally:
                    _ATTEMPT_DEADLINE.reset(token)
                self.breaker.succeeded(probe=probe)
                budget.observe(time.perf_counter() - sent)
                return result
        finally:
            metrics.redis_seconds(operation).observe(time.perf_counter() - start)

    def _refused(self, operation: str, probe: bool) -> Unavailable:
        """Redis answered, refusing the write (full, or read-only): a full or read-only Redis
        still serves every read, so this is no reason to open the circuit (Decide keeps
        personalising, its log write counted as lost, instead of falling back for everyone)."""
        self.breaker.succeeded(probe=probe)
        metrics.redis_errors(operation).inc()
        return Unavailable("store unavailable: the write was refused")

    def ping(self) -> bool:
        return self._run("ping", lambda: bool(self.client.ping()), budget=self.write)

    # --- decisions ------------------------------------------------------------------------

    def read_for_decision(self, *, user_id: str, request_id: str) -> DecisionInputs:
        k = keys.UserKeys.of(user_id)
        commands: list[tuple[Any, ...]] = [
            ("HGETALL", k.profile),
            ("HGETALL", k.signals),
            ("HGETALL", k.contacts),
            ("HGETALL", k.cooldowns),
            ("HGETALL", k.attributes),
            ("GET", keys.CATALOG_VERSION),
            ("GET", keys.MODEL_CURRENT),
        ]
        if request_id:
            commands.append(("HGET", k.requests, request_id))
        replies = self._run(
            "read_for_decision", lambda: self._round_trip(commands), budget=self.render
        )
        profile = _decode_profile(user_id, *(_as_dict(reply) for reply in replies[:5]))
        return DecisionInputs(
            profile=profile,
            catalog_version=int(replies[5] or 0),
            model_version=int(replies[6] or 0),
            replay_decision_id=replies[7] if request_id else None,
        )

    def add_cooldowns(
        self, *, user_key: str, fields: Sequence[str], until: float, started: float | None = None
    ) -> None:
        """Put offers or topics on the user's cooldown until ``until``, unless the user was
        erased since ``started`` (the time the call began: then nothing is written)."""
        k = keys.UserKeys.of_digest(user_key)
        at = time.time() if started is None else started
        self._run(
            "add_cooldowns",
            lambda: self._add_cooldowns(
                keys=[k.cooldowns, k.erased], args=[k.digest, repr(at), repr(until), *fields]
            ),
            budget=self.write,
        )

    def log_decision(
        self,
        *,
        user_id: str,
        decision: LoggedDecision,
        request_id: str,
        learn_after: float | None,
        spend: ContactSpend | None = None,
    ) -> list[str] | None:
        """Log the decision and, with ``spend``, consume its contacts; return the offers the
        caps script counted (None without ``spend``). If a concurrent Decide took the last
        unit, the caller logs again with what was kept.

        The decision's own keys (record, owner, reward window) are written first, then the
        user's scripts: the caps script (which also claims the request id, atomically with the
        counting) and the log script (the user's decision index, and the request id's). On one
        Redis that is one round trip, run in that order; on a cluster, two (the user's slot is
        on another node). So when the user's index names a decision, its record is there for
        an erasure to delete. Both user scripts are fenced: a Decide that was in flight while
        the user was erased writes nothing of the user (``Aborted``), and its record is taken
        back. If a concurrent Decide with the same request id claimed it first, the record is
        taken back too and RequestTaken names the winner (whose answer the caller replays), so
        one request id is one decision, counted once."""
        k = keys.UserKeys.of(user_id)
        d = keys.DecisionKeys.of(decision.decision_id)
        made_at = float(decision.payload.get("ts", 0.0))
        ttl = self._decision_ttl
        records: list[tuple[Any, ...]] = [
            ("SET", d.record, _record_json(decision.payload), "EX", ttl),
            ("SET", d.owner, k.digest, "EX", ttl),
        ]
        if learn_after is not None:
            records.append(("ZADD", keys.AWAITING, learn_after, decision.decision_id))
        fence = (k.digest, repr(made_at))
        user: list[tuple[Any, ...]] = []
        if spend is not None:
            user.append(
                ("EVALSHA", self._consume_contacts.sha, 4, k.contacts, k.profile, k.requests,
                 k.erased, *fence, *spend.args())
            )  # fmt: skip
        user.append(
            ("EVALSHA", self._log_decision.sha, 4, k.decided, k.requests, k.requested, k.erased,
             *fence, decision.decision_id, repr(made_at), ttl, MAX_DECISIONS_PER_USER,
             request_id, "0" if spend is not None else "1", self._request_ttl,
             MAX_REQUEST_IDS_PER_USER)
        )  # fmt: skip

        def send() -> list[Any]:
            if not self._cluster:
                return self._round_trip([*records, *user])[len(records) :]
            self._round_trip(records)
            return self._round_trip(user)

        def attempt() -> list[Any]:
            try:
                return send()
            except redis.exceptions.NoScriptError:
                # Redis restarted or was flushed since the scripts were loaded: everything
                # sent is idempotent, so load them and send it all again.
                for script in (self._consume_contacts, self._log_decision):
                    self.client.script_load(script.script)
                return send()

        # On the write budget, not the render one: a decision that is not logged can never
        # be joined with its outcome nor learned from, and the page waiting for it gave the
        # time with its deadline (on the render budget, 25 ms Redis stalls left decisions
        # answered but unlogged: bench/soak.py). Idempotent: the record, owner and window
        # are sets; the caps script counts a decision once however often it is sent (its
        # ``spent`` mark), the log script indexes it once.
        try:
            replies = self._run("log_decision", attempt, budget=self.write)
            logged = replies[-1]
            if ERASED in (logged, replies[0]):
                raise Aborted("the user was erased while this decision was made")
            if logged[0] == "!":
                raise RequestTaken(str(logged[1]))
            consumed = None if spend is None else _consumed(replies[0])
        except (Aborted, RequestTaken, Unavailable, Abandoned):
            # Take back what went out with it (all of it, or none, or its record alone: a
            # failed write cannot tell), or the learner would learn a reward 0 for a decision
            # never served, or a record would outlive the index an erasure reads. If Redis
            # cannot be asked now either, the record expires with its TTL.
            self._forget_quietly(user_id, [decision.decision_id])
            raise
        if len(logged) > 1:  # the user's index was full: its oldest decisions go
            self._forget_quietly(user_id, [str(old) for old in logged[1:]])
        return consumed

    def _forget_quietly(self, user_id: str, decision_ids: Sequence[str]) -> None:
        """``_forget_decisions`` as a clean-up: on the store's own time (the caller's
        deadline is the caller's), and a store that cannot be asked is no error."""
        with deadline.call_deadline(None), contextlib.suppress(Unavailable):
            self._forget_decisions(user_id, decision_ids)

    def _forget_decisions(self, user_id: str, decision_ids: Sequence[str]) -> None:
        """Delete decisions (records, outcomes, owners, reward windows) and then take them off
        the user's indexes; on a cluster, the user's slot last, so an index never names a
        decision that is gone while one it does not name is still there."""
        k = keys.UserKeys.of(user_id)
        for start in range(0, len(decision_ids), 500):
            chunk = decision_ids[start : start + 500]
            decisions: list[tuple[Any, ...]] = []
            for decision_id in chunk:
                d = keys.DecisionKeys.of(decision_id)
                decisions.append(("DEL", d.record, d.outcomes, d.owner))
            decisions += [("ZREM", keys.AWAITING, *chunk), ("HDEL", keys.LEARNED, *chunk)]
            index = [("ZREM", k.decided, *chunk), ("SREM", k.decisions, *chunk)]
            for commands in (decisions, index):
                self._run(
                    "forget_decisions", partial(self._round_trip, commands), budget=self.write
                )

    def get_logged_decision(
        self, *, decision_id: str, render: bool = False
    ) -> LoggedDecision | None:
        """The logged decision, with its owner; ``render``: for a Decide (a replay), on the
        render budget."""
        d = keys.DecisionKeys.of(decision_id)
        commands: list[tuple[Any, ...]] = [("GET", d.record), ("GET", d.owner)]
        raw, owner = self._run(
            "get_logged_decision",
            lambda: self._round_trip(commands),
            budget=self.render if render else self.write,
        )
        if raw is None:
            return None
        return LoggedDecision(decision_id=decision_id, payload=json.loads(raw), owner=owner)

    def record_outcome(
        self, *, decision_id: str, offer_id: str, outcome_id: str, outcome: dict[str, Any]
    ) -> RecordedOutcome:
        """Store the outcome (once per outcome_id) and send the offer's first reward to the
        learner while its reward window is open: one script in the decision's slot, then
        one in the stream's (see ``_SEND_REWARD_LUA``). A duplicate outcome_id sends again
        too: a no-op, unless the first attempt failed between the two."""
        k = keys.DecisionKeys.of(decision_id)
        # Both scripts are idempotent, so both are retried: the first answers "recorded"
        # again when it finds this very outcome (same JSON, same time) already stored.
        reply: Any = self._run(
            "record_outcome",
            lambda: self._record_outcome(
                keys=[k.record, k.outcomes],
                args=[offer_id, outcome_id, json.dumps(outcome, separators=(",", ":"))],
            ),
            budget=self.write,
        )
        status, record = reply[0], reply[1]
        arm = reply[2] if len(reply) > 2 else ""
        if record is not None and int(status) >= 0:
            vector = json.loads(record)["features"][offer_id]
            args = [
                decision_id,
                offer_id,
                repr(float(outcome["reward"])),
                json.dumps(vector, separators=(",", ":")),
                repr(float(outcome["ts"])),
            ]
            self._run(
                "record_outcome",
                lambda: self._send_reward(
                    keys=[keys.AWAITING, keys.LEARNED, keys.OUTCOME_STREAM], args=args
                ),
                budget=self.write,
            )
        return RecordedOutcome(int(status), arm if isinstance(arm, str) else "")

    # --- profiles -------------------------------------------------------------------------

    def get_profile(self, *, user_id: str) -> Profile:
        k = keys.UserKeys.of(user_id)

        def read() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            pipe.hgetall(k.profile)
            pipe.hgetall(k.signals)
            pipe.hgetall(k.contacts)
            pipe.hgetall(k.cooldowns)
            pipe.hgetall(k.attributes)
            return pipe.execute()

        replies = self._run("get_profile", read, budget=self.write)
        return _decode_profile(user_id, *replies)

    def set_preferences(self, *, update: PreferencesUpdate, now: float) -> Profile:
        """Merge the preferences and return the profile right after, atomically (one script:
        all or nothing, and no concurrent writer in between). A call that would leave the
        user more topic stances or channel choices than ``validation`` allows writes nothing
        and raises ``InvalidArgument`` naming the bound."""
        k = keys.UserKeys.of(update.user_id)
        to_set, to_clear, withdrawn = _preference_fields(update, now)
        args: list[Any] = [
            k.digest,
            repr(now),
            validation.MAX_TOPIC_PREFERENCES_PER_USER,
            validation.MAX_CHANNEL_PREFERENCES_PER_USER,
            1 if withdrawn else 0,
            len(to_clear),
            *to_clear,
            *itertools.chain.from_iterable(to_set.items()),
        ]
        # Idempotent: every field is set to a value stamped with ``now``, taken once.
        reply = self._merge_into_profile(
            "set_preferences",
            self._set_preferences,
            [k.profile, k.signals, k.contacts, k.cooldowns, k.attributes, k.erased],
            args,
        )
        if not int(reply[0]):
            field, what, limit = (
                ("topic_preferences", "topic stances", validation.MAX_TOPIC_PREFERENCES_PER_USER)
                if reply[1] == "t"
                else (
                    "channel_preferences",
                    "channel choices",
                    validation.MAX_CHANNEL_PREFERENCES_PER_USER,
                )
            )
            raise InvalidArgument(
                [
                    FieldViolation(
                        field,
                        f"a user holds at most {limit} {what}; this would leave {reply[2]} "
                        "(set some to NEUTRAL first)",
                    )
                ]
            )
        return _decode_profile(update.user_id, *(_as_dict(hash_) for hash_ in reply[1:]))

    def _merge_into_profile(
        self, operation: str, script: Callable[..., Any], user_keys: list[str], args: list[Any]
    ) -> Any:
        """Run a fenced script that merges into a user's profile and answers ``[ok, hashes of
        the profile right after ...]`` (or the bound it would pass): on the write budget,
        retried (the merges are idempotent); ``Aborted`` if the user was erased meanwhile."""
        reply = self._run(operation, lambda: script(keys=user_keys, args=args), budget=self.write)
        return _check_not_erased(reply)

    def set_attributes(self, *, update: AttributesUpdate, now: float, limit: int) -> Profile:
        """Merge the attributes (STATED outranks IMPORTED, an empty value removes; see
        ``_SET_ATTRIBUTES_LUA``) and return the profile right after, atomically. A merge that
        would leave the user more than ``limit`` attributes writes nothing and raises
        ``InvalidArgument``."""
        k = keys.UserKeys.of(update.user_id)
        args: list[Any] = [k.digest, repr(now), int(update.source or 0), f"{now:.6f}", limit]
        args.append(update.user_id)
        for name, value in update.attributes:
            args += [name, value]
        # Idempotent: the same values with the same stamp, and the cap counts what they leave.
        reply = self._merge_into_profile(
            "set_attributes",
            self._set_attributes,
            [k.attributes, k.profile, k.signals, k.contacts, k.cooldowns, k.erased],
            args,
        )
        if not int(reply[0]):
            raise InvalidArgument(
                [
                    FieldViolation(
                        "attributes",
                        f"a user holds at most {limit} attributes; this would leave {reply[1]}",
                    )
                ]
            )
        return _decode_profile(update.user_id, *(_as_dict(hash_) for hash_ in reply[1:]))

    def record_signals(
        self, *, user_id: str, signals: Sequence[Signal], now: float | None = None
    ) -> bool:
        """Keep the signals if the user consented; False (and nothing kept) otherwise.
        ``now``: when the call began (for the erasure fence)."""
        k = keys.UserKeys.of(user_id)
        started = time.time() if now is None else now
        args: list[Any] = [k.digest, repr(started), self._half_life]
        args.append(validation.MAX_SIGNAL_TOPICS_PER_USER)
        for signal in signals:
            args += [signal.topic, repr(float(signal.weight)), f"{signal.observed_at:.6f}"]
        # Not idempotent: observations add up, so a second attempt after a timeout could
        # count them twice. Tried again only when the first was never sent.
        kept = int(
            self._run(
                "record_signals",
                lambda: _check_not_erased(
                    self._record_signals(keys=[k.signals, k.profile, k.erased], args=args)
                ),
                budget=self.write,
                idempotent=False,
            )
        )
        if kept < 0:
            limit = validation.MAX_SIGNAL_TOPICS_PER_USER
            raise InvalidArgument(
                [
                    FieldViolation(
                        "signals",
                        f"a user holds signals of at most {limit} topics; this would leave {-kept}",
                    )
                ]
            )
        return bool(kept)

    def delete_profile(self, *, user_id: str, now: float | None = None) -> None:
        """Erasure: the user's keys, and every decision logged for them with its outcomes
        (they hold a pseudonym and the request context). First, atomically in the user's
        slot, the user goes on the erasure fence and their keys go; then the decisions their
        index names, in their own slots; then the index. A call that was in flight meanwhile
        (started before ``now``) cannot write anything of the user again: every script that
        writes a user's keys checks the fence. Idempotent: retried, it finds what is left."""
        k = keys.UserKeys.of(user_id)
        at = time.time() if now is None else now

        # Its decision indexes last: the script returns what they name, then deletes the rest.
        user_keys = [k.erased, k.profile, k.signals, k.contacts, k.requests, k.cooldowns]
        user_keys += [k.attributes, k.requested, k.decisions, k.decided]
        fence: list[Any] = [k.digest, repr(at), ERASURE_FENCE_SECONDS]
        ids: Any = self._run(
            "delete_profile",
            lambda: self._erase_user(keys=user_keys, args=fence),
            budget=self.write,
        )
        if ids:
            self._forget_decisions(user_id, [str(i) for i in ids])

    # --- bulk import and export ---------------------------------------------------------

    def write_profiles(
        self, records: Sequence[ProfileRecord], *, limit: int, started: float | None = None
    ) -> list[ProfileWrite]:
        """Write validated profile records (``tactful import``) in ONE round trip: one
        ``_IMPORT_PROFILE_LUA`` call per user, all its keys in the user's slot, sent as a
        non-transactional pipeline (on a cluster, each node gets its users' calls). Per user,
        atomically: the profile hash as SetPreferences writes it (with the user id), the
        signals deleted if consent is withdrawn, the attributes through SetAttributes' own
        merge (one per source and time, so STATED outranks IMPORTED and the per-user cap
        holds as in the API), then the signals as RecordSignals' script writes them in its
        replacing mode (kept only with consent, read after the profile was written). Not all
        or nothing per batch: every write sets a state, so a failed batch is repaired by
        writing it again."""
        commands: list[tuple[Any, ...]] = []
        sha = self._import_profile.sha
        fence_at = repr(time.time() if started is None else started)  # the erasure fence
        for record in records:
            user_digest = keys.user_digest(record.user_id)
            profile, attributes, signals, fence = keys.import_keys(user_digest)
            to_set, to_clear, withdrawn = _preference_fields(record.preferences, None)
            args: list[Any] = [
                "EVALSHA", sha, 4, profile, attributes, signals, fence, user_digest, fence_at,
                limit, 1 if withdrawn else 0, len(to_clear), len(to_set),
                validation.MAX_TOPIC_PREFERENCES_PER_USER,
                validation.MAX_CHANNEL_PREFERENCES_PER_USER,
                validation.MAX_SIGNAL_TOPICS_PER_USER,
                *to_clear, *itertools.chain.from_iterable(to_set.items()),
            ]  # fmt: skip
            if record.attributes:
                # One merge per (source, time): usually one per line.
                groups: dict[tuple[int, float], list[str]] = {}
                for a in record.attributes:
                    group = groups.get((a.source, a.updated_at))
                    if group is None:
                        group = groups[a.source, a.updated_at] = []
                    group += (a.name, a.value)
                args.append(len(groups))
                for (source, at), pairs in groups.items():
                    args += (int(source), f"{at:.6f}", len(pairs) // 2, *pairs)
            else:
                args.append(0)
            for signal in record.signals:
                args += (signal.topic, repr(signal.weight), f"{signal.observed_at:.6f}")
            commands.append(tuple(args))

        def write() -> list[Any]:
            try:
                return self._round_trip(commands)
            except redis.exceptions.NoScriptError:
                # A Redis that never ran the script (or restarted): load it and write the
                # batch again, which sets the same state.
                self.client.script_load(self._import_profile.script)
                return self._round_trip(commands)

        replies = self._run("write_profiles", write, budget=self.write)
        results = []
        for reply in replies:
            if reply == ERASED:
                results.append(ProfileWrite(None, 0, erased=True))
                continue
            if int(reply) < 0:
                results.append(ProfileWrite(None, 0, over_bound=_IMPORT_BOUNDS[-int(reply)]))
                continue
            refused, signals = divmod(int(reply), 3)
            kept = None if signals == 0 else signals == 2
            results.append(ProfileWrite(signals_kept=kept, attributes_refused=refused))
        return results

    def scan_profiles(self, *, batch: int = 500) -> Iterator[tuple[str | None, Profile]]:
        """Every stored profile (preferences, consent, attributes, signals as stored: weight
        at observed_at) with the user id kept in its profile hash: None for a profile last
        written before user ids were kept (keys only hold a digest). Found with SCAN (on a
        cluster, redis-py scans every primary), read ``batch`` users per round trip; SCAN
        may return a user twice while Redis resizes its table (harmless to an import)."""
        found: list[str] = []
        for key in self.client.scan_iter(match=keys.USER_PROFILES, count=1000):
            found.append(key)
            if len(found) >= batch:
                yield from self._read_profiles(found)
                found = []
        if found:
            yield from self._read_profiles(found)

    def _read_profiles(self, profile_keys: Sequence[str]) -> Iterator[tuple[str | None, Profile]]:
        users = [keys.UserKeys.of_digest(keys.digest_of(key)) for key in profile_keys]
        commands: list[tuple[Any, ...]] = []
        for k in users:
            commands += (("HGETALL", k.profile), ("HGETALL", k.signals), ("HGETALL", k.attributes))
        replies = self._run("scan_profiles", lambda: self._round_trip(commands), budget=self.write)
        for i in range(0, len(replies), 3):
            fields = _as_dict(replies[i])
            if not fields:  # deleted since the SCAN found it
                continue
            user_id = fields.get("user_id")
            signals, attributes = _as_dict(replies[i + 1]), _as_dict(replies[i + 2])
            yield user_id, _decode_profile(user_id or "", fields, signals, {}, {}, attributes)

    # --- catalog --------------------------------------------------------------------------

    def catalog_version(self) -> int:
        version = self._run(
            "catalog_version", lambda: self.client.get(keys.CATALOG_VERSION), budget=self.write
        )
        return int(version or 0)

    def load_model(self, *, version: int) -> bytes | None:
        raw: Any = self._run(
            "load_model",
            lambda: _undecoded(self.client, "GET", keys.model_snapshot(version)),
            budget=self.write,
        )
        return None if raw is None else bytes(raw)

    def load_catalog(self) -> tuple[int, list[Offer], list[Segment]]:
        """The catalog's version, offers and segments, read together: a process never holds
        offers of one version with segments of another. Every catalog write bumps the
        version in the same atomic step, so the version read before and after the offers and
        segments (one round trip) tells whether a write came in between; then it is read
        again. Not MULTI/EXEC: Redis 6 refuses MULTI once maxmemory is reached, and a full
        Redis must still serve the catalog (reads work; see WRITE_REFUSED_ERRORS)."""
        commands = [
            ("GET", keys.CATALOG_VERSION),
            ("HGETALL", keys.CATALOG_OFFERS),
            ("HGETALL", keys.CATALOG_SEGMENTS),
            ("GET", keys.CATALOG_VERSION),
        ]
        for _ in range(CATALOG_READ_ATTEMPTS):
            version, raw_offers, raw_segments, version_after = self._run(
                "load_catalog", lambda: self._round_trip(commands), budget=self.write
            )
            if version == version_after:
                break
        else:
            raise Unavailable("the catalog kept changing while it was read")
        offers = [_decode_offer(v) for v in _as_dict(raw_offers).values()]
        segments = [_decode_segment(v) for v in _as_dict(raw_segments).values()]
        return int(version or 0), offers, segments

    def put_offer(self, *, offer: Offer) -> None:
        """Put the offer if every segment it names exists (checked in the same script);
        ``InvalidArgument`` naming each missing one otherwise, and nothing written."""
        named = list(dict.fromkeys((*offer.segments, *offer.excluded_segments)))
        missing: Any = self._run(
            "put_offer",
            lambda: self._put_offer(
                keys=[keys.CATALOG_OFFERS, keys.CATALOG_SEGMENTS, keys.CATALOG_VERSION],
                args=[offer.offer_id, json.dumps(asdict(offer)), *named],
            ),
            budget=self.write,
        )
        if missing:
            unknown = set(missing)
            raise InvalidArgument(
                [
                    FieldViolation(f"offer.{name}[{i}]", f"segment {segment_id!r} does not exist")
                    for name, ids in (
                        ("segments", offer.segments),
                        ("excluded_segments", offer.excluded_segments),
                    )
                    for i, segment_id in enumerate(ids)
                    if segment_id in unknown
                ]
            )

    def get_offer(self, *, offer_id: str) -> Offer | None:
        raw = self._run(
            "get_offer", lambda: self.client.hget(keys.CATALOG_OFFERS, offer_id), budget=self.write
        )
        return None if raw is None else _decode_offer(str(raw))

    def delete_offer(self, *, offer_id: str) -> bool:

        def delete() -> list[Any]:
            pipe = self.client.pipeline(transaction=True)
            pipe.hdel(keys.CATALOG_OFFERS, offer_id)
            pipe.incr(keys.CATALOG_VERSION)
            return pipe.execute()

        # Not retried after a timeout: a second attempt would find nothing and say so.
        deleted, _ = self._run("delete_offer", delete, budget=self.write, idempotent=False)
        return bool(deleted)

    def put_segment(self, *, segment: Segment, limit: int) -> None:
        """Create or replace the segment; a new one when the catalog holds ``limit`` already
        is ``FailedPrecondition`` (checked in the same script)."""
        put = self._run(
            "put_segment",
            lambda: self._put_segment(
                keys=[keys.CATALOG_SEGMENTS, keys.CATALOG_VERSION],
                args=[segment.segment_id, json.dumps(asdict(segment)), limit],
            ),
            budget=self.write,
        )
        if not int(put):
            raise FailedPrecondition(
                f"the catalog holds {limit} segments, the most TACTFUL_MAX_SEGMENTS allows: "
                "delete one first"
            )

    def get_segment(self, *, segment_id: str) -> Segment | None:
        raw = self._run(
            "get_segment",
            lambda: self.client.hget(keys.CATALOG_SEGMENTS, segment_id),
            budget=self.write,
        )
        return None if raw is None else _decode_segment(str(raw))

    def delete_segment(self, *, segment_id: str) -> bool:
        """Delete the segment; False if there is none. ``FailedPrecondition`` naming the
        offers when offers still name it (nothing deleted)."""
        # Not retried after a timeout: a second attempt would find nothing and say so.
        reply: Any = self._run(
            "delete_segment",
            lambda: self._delete_segment(
                keys=[keys.CATALOG_SEGMENTS, keys.CATALOG_OFFERS, keys.CATALOG_VERSION],
                args=[segment_id],
            ),
            budget=self.write,
            idempotent=False,
        )
        status = int(reply[0])
        if status < 0:
            offers = sorted(str(o) for o in reply[1:])
            shown = ", ".join(repr(o) for o in offers[:10])
            more = f" and {len(offers) - 10} more" if len(offers) > 10 else ""
            raise FailedPrecondition(
                f"segment {segment_id!r} is named by {len(offers)} offer(s): {shown}{more}; "
                "remove it from their segments and excluded_segments first"
            )
        return status == 1

    # --- rate limits ----------------------------------------------------------------------

    def take_token(self, *, bucket: str, rate: float, burst: float) -> float:
        """Take a token from ``bucket``: 0.0 if taken, else the seconds to wait for one."""
        # On the render budget (it delays every call), and not retried: a second attempt
        # could take a second token.
        wait = self._run(
            "rate_limit",
            lambda: self._take_token(keys=[bucket], args=[rate, burst]),
            budget=self.render,
            idempotent=False,
        )
        return float(wait)


def _undecoded(client: Client, *command: Any) -> Any:
    """A command's reply left as bytes (model snapshots and the learner's state are bytes),
    on the decoding client: one pool serves both, and a cluster needs no second client."""
    return client.execute_command(*command, **{NEVER_DECODE: []})  # type: ignore[no-untyped-call]


class ModelStore:
    """What the learner and the model CLI need: the reward stream, the learner's checkpoint,
    and the versioned model snapshots (all in the {model} slot)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._close_windows = client.register_script(_CLOSE_WINDOWS_LUA)
        self._renew_lease = client.register_script(_RENEW_LEASE_LUA)
        self._publish_model = client.register_script(_PUBLISH_MODEL_LUA)
        self._rollback_model = client.register_script(_ROLLBACK_MODEL_LUA)

    def hold_lease(self, token: str, ttl_ms: int) -> bool:
        """Take the learner lease, or renew it if this token holds it."""
        if self.client.set(keys.LEARNER_LEASE, token, nx=True, px=ttl_ms):
            return True
        return bool(self._renew_lease(keys=[keys.LEARNER_LEASE], args=[token, ttl_ms]))

    def release_lease(self, token: str) -> None:
        self._renew_lease(keys=[keys.LEARNER_LEASE], args=[token, 1])

    def ensure_group(self) -> None:
        try:
            self.client.xgroup_create(
                keys.OUTCOME_STREAM, keys.LEARNER_GROUP, id="0", mkstream=True
            )
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def claim_all(self, consumer: str) -> list[tuple[str, dict[str, str]]]:
        """Take over every entry delivered to a consumer that never acknowledged it (a learner
        that died); only one learner runs at a time, so nothing idle is still being worked on."""
        claimed: list[tuple[str, dict[str, str]]] = []
        start = "0-0"
        while True:
            reply: Any = self.client.xautoclaim(
                keys.OUTCOME_STREAM, keys.LEARNER_GROUP, consumer, 0, start, count=500
            )
            start, entries = reply[0], reply[1]
            claimed += [(entry_id, fields) for entry_id, fields in entries if fields]
            if start == "0-0":
                return claimed

    def read_new(
        self, consumer: str, *, count: int, block_ms: int
    ) -> list[tuple[str, dict[str, str]]]:
        reply: Any = self.client.xreadgroup(
            keys.LEARNER_GROUP,
            consumer,
            {keys.OUTCOME_STREAM: ">"},
            count=count,
            block=block_ms or None,
        )
        return [(entry_id, fields) for _, entries in reply or [] for entry_id, fields in entries]

    def close_due_windows(
        self, now: float, *, batch: int = 500, max_batches: int = 20, per_script: int = 100
    ) -> int:
        """Send reward 0 for every chosen offer whose reward window ended without an outcome.
        Works through the due decisions in batches: one pipelined read of their logged
        decisions (in their own slots), then the closing script in the {model} slot, on
        ``per_script`` decisions at a time (it runs atomically: kept short); up to
        ``max_batches`` per call so a large backlog cannot stall the learner's loop."""
        sent = 0
        for _ in range(max_batches):
            due: Any = self.client.zrangebyscore(keys.AWAITING, "-inf", now, start=0, num=batch)
            if not due:
                break
            pipe = self.client.pipeline(transaction=False)
            for decision_id in due:
                pipe.get(keys.DecisionKeys.of(decision_id).record)
            pending = list(zip(due, pipe.execute(), strict=True))
            for start in range(0, len(pending), per_script):
                args: list[Any] = [repr(now)]
                for decision_id, record in pending[start : start + per_script]:
                    args += [decision_id, *_unlearned_vectors(record)]
                sent += int(
                    self._close_windows(
                        keys=[keys.AWAITING, keys.LEARNED, keys.OUTCOME_STREAM], args=args
                    )
                )
            if len(due) < batch:
                break
        return sent

    def load_checkpoint(self) -> tuple[bytes, str] | None:
        raw: Any = _undecoded(self.client, "HMGET", keys.LEARNER_STATE, "state", "last_id")
        if raw[0] is None:
            return None
        return bytes(raw[0]), raw[1].decode()

    def checkpoint(self, state: bytes, last_id: str, acked: Sequence[str]) -> None:
        """Save the learner's state and acknowledge what it holds, together: after a crash
        the stream's pending entries are exactly those the saved state has not applied."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(keys.LEARNER_STATE, mapping={"state": state, "last_id": last_id})
        if acked:
            pipe.xack(keys.OUTCOME_STREAM, keys.LEARNER_GROUP, *acked)
            # Entries before the last applied one are in the state: the stream can drop them.
            pipe.xtrim(keys.OUTCOME_STREAM, minid=last_id, approximate=False)
        pipe.execute()

    def publish(self, snapshot: Callable[[int], bytes], *, keep: int, now: float) -> int | None:
        """Publish a new model version unless a rollback pinned an older one (checked in
        the same atomic step as the publish: a rollback racing it always wins)."""
        if self.client.exists(keys.MODEL_PINNED):
            return None  # the common case, without building a snapshot for nothing
        version = int(self.client.incr(keys.MODEL_SEQ))
        published = self._publish_model(
            keys=[
                keys.MODEL_PINNED,
                keys.MODEL_VERSIONS,
                keys.MODEL_CURRENT,
                keys.model_snapshot(version),
            ],
            args=[version, snapshot(version), now, keep, keys.MODEL_SNAPSHOTS],
        )
        return version if int(published) else None

    def versions(self) -> tuple[int, list[tuple[int, float]]]:
        current = int(self.client.get(keys.MODEL_CURRENT) or 0)
        listed: Any = self.client.zrange(keys.MODEL_VERSIONS, 0, -1, withscores=True)
        return current, [(int(v), float(ts)) for v, ts in listed]

    def rollback(self, version: int) -> None:
        """Serve ``version`` again and pin it: the learner keeps learning but publishes
        nothing until ``unpin``."""
        pinned = self._rollback_model(
            keys=[keys.model_snapshot(version), keys.MODEL_CURRENT, keys.MODEL_PINNED],
            args=[version],
        )
        if not int(pinned):
            raise KeyError(version)

    def unpin(self) -> None:
        self.client.delete(keys.MODEL_PINNED)

    def backlog(self) -> int:
        groups: Any = self.client.xinfo_groups(keys.OUTCOME_STREAM)
        return sum(int(g.get("lag") or 0) + int(g.get("pending") or 0) for g in groups)


#: What the operating system says when nothing listens where Redis should be: evidence that no
#: slow moment explains. (A reset is not: one dropped connection is counted in the rate.)
_REFUSALS = (ConnectionRefusedError, FileNotFoundError)


def _refused(error: BaseException) -> bool:
    """The connection was refused (redis-py wraps the OSError; a timeout, even one
    connecting, is not a refusal: a busy machine is slow to accept too)."""
    seen: BaseException | None = error
    for _ in range(5):  # redis-py's wrappers, the OSError under them
        if seen is None:
            return False
        if isinstance(seen, _REFUSALS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _check_not_erased(reply: _T) -> _T:
    """A fenced script's reply, unless it says the user was erased while the call was in
    flight (nothing was written): then ``Aborted``."""
    if reply == ERASED:
        raise Aborted(
            "the profile was erased while this call was in flight: nothing was written "
            "(sent again, it writes a new profile)"
        )
    return reply


def _unlearned_vectors(record: str | None) -> list[Any]:
    """A logged decision's chosen offers that have a feature vector, as the closing script
    takes them: n, then n (offer_id, vector JSON) pairs."""
    if record is None:  # expired or erased: the window just closes
        return [0]
    decision = json.loads(record)
    features = decision.get("features") or {}
    pairs: list[Any] = []
    for offer_id in decision["offer_ids"]:
        if offer_id in features:
            pairs += [offer_id, json.dumps(features[offer_id], separators=(",", ":"))]
    return [len(pairs) // 2, *pairs]


RoundTrip = Callable[[Sequence[tuple[Any, ...]]], list[Any]]


def round_trip(client: Client) -> RoundTrip:
    """How the Decide path sends its commands in one round trip, chosen here, once, by the
    client: on one Redis server, a hand-packed write on one pooled connection (measured
    faster than a pipeline); on a Redis Cluster, redis-py's ClusterPipeline, which sends
    each node its commands together and follows MOVED/ASK. Either way, error replies are
    raised only after every reply is read, and HGETALL replies may be raw (``_as_dict``)."""
    if isinstance(client, RedisCluster):
        return functools.partial(_cluster_round_trip, client)
    return functools.partial(_single_node_round_trip, client.connection_pool)


def _cluster_round_trip(client: RedisCluster, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
    pipe = client.pipeline(transaction=False)  # type: ignore[no-untyped-call]
    for command in commands:
        pipe.execute_command(*command)
    replies: list[Any] = pipe.execute()
    return replies


def _single_node_round_trip(
    pool: redis.ConnectionPool, commands: Sequence[tuple[Any, ...]]
) -> list[Any]:
    """The commands in one write, then their replies: one round trip on one pooled
    connection, what a non-transactional pipeline sends, minus a pipeline's per-command
    bookkeeping (command stack, options, response callbacks, observability hooks), which
    costs more client time than Redis spends on the commands. Not retried here: the
    store's ``_run`` knows whether the commands may be sent again, and for how long."""
    conn = pool.get_connection()
    try:
        return _exchange(conn, commands)
    finally:
        pool.release(conn)


def _exchange(conn: redis.Connection, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
    # Packed by hiredis (a dependency: redis[hiredis]), as redis-py packs them, minus its
    # per-command Python layer, which only matters for commands written as one string.
    packed = b"".join([hiredis.pack_command(command) for command in commands])
    conn.send_packed_command([packed])  # type: ignore[no-untyped-call]
    replies: list[Any] = []
    for _ in commands:
        try:
            replies.append(conn.read_response())
        except redis.exceptions.ResponseError as error:
            replies.append(error)
    for reply in replies:
        if isinstance(reply, redis.exceptions.ResponseError):
            raise reply
    return replies


def _record_json(payload: Mapping[str, Any]) -> bytes:
    """The decision record as JSON, written by orjson: a tenth of ``json.dumps``'s time on a
    record with its candidates and feature vectors (5 against 53 µs), on every Decide. Any
    JSON reader gets the same values back (floats are written shortest-round-trip)."""
    return orjson.dumps(payload)


def _as_dict(reply: Any) -> dict[str, str]:
    """An HGETALL reply as a dict: RESP2 gives a flat [field, value, ...] list, RESP3 a map."""
    if isinstance(reply, dict):
        return reply
    fields = iter(reply)
    return dict(zip(fields, fields, strict=False))


def _preference_fields(
    update: PreferencesUpdate, now: float | None
) -> tuple[dict[str, str], list[str], bool]:
    """What SetPreferences (and a bulk import) writes in the profile hash: the fields to set
    (the user id among them: the keys only hold its digest, and an export needs it), the
    fields to clear (NEUTRAL stances), and whether consent was withdrawn (the signals then
    go). Each stance, opt-in and consent is stamped with ``now``, or with its own
    ``updated_at`` when ``now`` is None (an import carrying the times it was given)."""
    to_set: dict[str, str] = {"user_id": update.user_id}
    to_clear: list[str] = []
    for pref in update.topic_preferences:
        field = f"t:{pref.topic}"
        if pref.stance is Stance.NEUTRAL:
            to_clear.append(field)
        else:
            at = pref.updated_at if now is None else now
            to_set[field] = f"{int(pref.stance or 0)}|{at:.6f}"
    for channel_pref in update.channel_preferences:
        at = channel_pref.updated_at if now is None else now
        to_set[f"c:{channel_pref.channel}"] = f"{int(channel_pref.opted_in)}|{at:.6f}"
    if update.max_messages_per_day is not None:
        to_set["max_per_day"] = str(update.max_messages_per_day)
    if update.quiet_hours is not None:
        quiet = update.quiet_hours
        to_set["quiet"] = f"{quiet.start_hour}|{quiet.end_hour}|{quiet.time_zone}"
    withdrawn = update.consent is not None and not update.consent.inferred_personalization
    if update.consent is not None:
        at = update.consent.updated_at if now is None else now
        to_set["consent"] = f"{int(update.consent.inferred_personalization)}|{at:.6f}"
    return to_set, to_clear, withdrawn


def _decode_offer(raw: str) -> Offer:
    data = json.loads(raw)
    data["topics"] = tuple(data["topics"])
    data["channels"] = tuple(data["channels"])
    # Offers stored before targeting existed have neither list: open to everyone.
    data["segments"] = tuple(data.get("segments", ()))
    data["excluded_segments"] = tuple(data.get("excluded_segments", ()))
    return Offer(**data)


def _decode_segment(raw: str) -> Segment:
    return Segment(**json.loads(raw))


def _split_ts(value: str) -> tuple[str, float]:
    head, _, ts = value.partition("|")
    return head, float(ts or 0)


def _decode_profile(
    user_id: str,
    fields: dict[str, str],
    signals: dict[str, str],
    contacts: dict[str, str],
    cooldowns: dict[str, str],
    attributes: dict[str, str],
) -> Profile:
    """The profile as stored, in no particular order: Decide reads it on every request and
    needs no order; ``ProfileService`` sorts what it presents."""
    topics: list[TopicPreference] = []
    channels: list[ChannelPreference] = []
    max_per_day = 0
    quiet: QuietHours | None = None
    consent = Consent()
    for name, value in fields.items():
        kind, _, key = name.partition(":")
        if kind == "t":
            stance, ts = _split_ts(value)
            topics.append(TopicPreference(key, Stance(int(stance)), ts))
        elif kind == "c":
            opted_in, ts = _split_ts(value)
            channels.append(ChannelPreference(key, opted_in == "1", ts))
        elif name == "max_per_day":
            max_per_day = int(value)
        elif name == "quiet":
            start, end, tz = value.split("|", 2)
            quiet = QuietHours(int(start), int(end), tz)
        elif name == "consent":
            given, ts = _split_ts(value)
            consent = Consent(given == "1", ts)
    decoded_signals = []
    for topic, value in signals.items():
        weight, _, observed = value.partition("|")
        decoded_signals.append(Signal(topic, float(weight), float(observed)))
    counters = []
    last_contacts = []
    for field, count in contacts.items():
        if field in ("spent", DAY_MARK):  # the caps script's notes (its last decision,
            continue  # the day of the counters), not counters
        window, _, rest = field.partition("|")
        if window == "last":  # "last|<channel>" -> when that channel was last used
            last_contacts.append((rest, float(count)))
            continue
        channel, _, offer_id = rest.partition("|")
        counters.append(ContactCounter(channel, offer_id, int(count), float(window)))
    cooling = []
    for field, until in cooldowns.items():
        kind, _, name = field.partition(":")
        cooling.append(
            Cooldown(name if kind == "o" else "", name if kind == "t" else "", float(until))
        )
    facts = []
    for name, stored in attributes.items():
        source, updated_at, value = stored.split("|", 2)
        facts.append(Attribute(name, value, AttributeSource(int(source)), float(updated_at)))
    return Profile(
        user_id=user_id,
        topic_preferences=tuple(topics),
        channel_preferences=tuple(channels),
        max_messages_per_day=max_per_day,
        quiet_hours=quiet,
        consent=consent,
        signals=tuple(decoded_signals),
        contact_counters=tuple(counters),
        last_contacts=tuple(last_contacts),
        cooldowns=tuple(cooling),
        attributes=tuple(facts),
    )
