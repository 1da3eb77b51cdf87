"""How the store's data is laid out in Redis: the one place that knows field names and
encodings (keys are named in ``tactful.keys``).

A user's hashes (``keys.UserKeys``):

- profile: ``t:<topic>`` -> "<stance>|<updated_at>", ``c:<channel>`` -> "<1/0>|<updated_at>",
  ``max_per_day``, ``quiet`` -> "<start>|<end>|<time zone>", ``consent`` ->
  "<1/0>|<updated_at>", ``user_id`` (key names only hold a digest of it);
- signals: topic -> "<weight>|<observed_at>";
- contacts: the caps script's counters and notes (``lua/consume_contacts.lua`` lays them out);
- cooldowns: ``o:<offer_id>`` / ``t:<topic>`` -> until;
- attributes: name -> "<source>|<updated_at>|<value>" (the value last: it may hold '|').

Decision records, offers and segments are JSON. The scripts' ARGV that carry these are built
here too, and their replies read here, beside the layouts they follow.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import orjson

from tactful import keys, validation
from tactful.contact_policy import CARRY_SECONDS, COUNTERS_TTL_SECONDS
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
from tactful.store import reward_vectors
from tactful.store.scripts import ERASED
from tactful.store.types import ContactSpend, ProfileWrite, RequestTaken

# --- JSON ---------------------------------------------------------------------------------


def record_json(payload: Mapping[str, Any]) -> bytes:
    """The decision record as JSON, written by orjson: on every Decide, a record with its
    candidates and feature vectors, in a fraction of ``json.dumps``'s time. Any JSON reader
    gets the same values back (floats are written shortest-round-trip)."""
    return orjson.dumps(payload)


def decode_record(raw: str | bytes) -> dict[str, Any]:
    record: dict[str, Any] = json.loads(raw)
    return record


def compact_json(value: Any) -> str:
    """An outcome as the scripts store it."""
    return json.dumps(value, separators=(",", ":"))


def offer_vector(record: str, offer_id: str) -> str:
    """The feature vector a logged decision holds for ``offer_id``, as the reward stream
    carries it (``reward_vectors``)."""
    return reward_vectors.pack(decode_record(record)["features"][offer_id])


def unlearned_vectors(record: str | None) -> list[Any]:
    """A logged decision's chosen offers that have a feature vector, as the closing script
    takes them: n, then n (offer_id, packed vector) pairs."""
    if record is None:  # expired or erased: the window just closes
        return [0]
    decision = decode_record(record)
    features = decision.get("features") or {}
    pairs: list[Any] = []
    for offer_id in decision["offer_ids"]:
        if offer_id in features:
            pairs += [offer_id, reward_vectors.pack(features[offer_id])]
    return [len(pairs) // 2, *pairs]


def offer_json(offer: Offer) -> str:
    return json.dumps(asdict(offer))


def segment_json(segment: Segment) -> str:
    return json.dumps(asdict(segment))


def decode_offer(raw: str) -> Offer:
    data = json.loads(raw)
    data["topics"] = tuple(data["topics"])
    data["channels"] = tuple(data["channels"])
    # An offer without targeting lists is open to everyone.
    data["segments"] = tuple(data.get("segments", ()))
    data["excluded_segments"] = tuple(data.get("excluded_segments", ()))
    return Offer(**data)


def decode_segment(raw: str) -> Segment:
    return Segment(**json.loads(raw))


# --- the profile hash and the scripts that write it --------------------------------------


def as_dict(reply: Any) -> dict[str, str]:
    """An HGETALL reply as a dict: RESP2 gives a flat [field, value, ...] list, RESP3 a map."""
    if isinstance(reply, dict):
        return reply
    fields = iter(reply)
    return dict(zip(fields, fields, strict=False))


def preference_fields(
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


def preferences_args(update: PreferencesUpdate, now: float) -> list[Any]:
    """``lua/set_preferences.lua``'s ARGV."""
    to_set, to_clear, withdrawn = preference_fields(update, now)
    return [
        validation.MAX_TOPIC_PREFERENCES_PER_USER,
        validation.MAX_CHANNEL_PREFERENCES_PER_USER,
        1 if withdrawn else 0,
        len(to_clear),
        *to_clear,
        *itertools.chain.from_iterable(to_set.items()),
    ]


def attributes_args(update: AttributesUpdate, now: float, limit: int) -> list[Any]:
    """``lua/set_attributes.lua``'s ARGV."""
    args: list[Any] = [int(update.source or 0), f"{now:.6f}", limit, update.user_id]
    for name, value in update.attributes:
        args += [name, value]
    return args


def signals_args(signals: Iterable[Signal], half_life_seconds: float) -> list[Any]:
    """``lua/record_signals.lua``'s ARGV."""
    args: list[Any] = [half_life_seconds, validation.MAX_SIGNAL_TOPICS_PER_USER]
    for signal in signals:
        args += [signal.topic, repr(float(signal.weight)), f"{signal.observed_at:.6f}"]
    return args


def import_args(record: ProfileRecord, limit: int) -> list[Any]:
    """``lua/import_profile.lua``'s ARGV for one validated record."""
    to_set, to_clear, withdrawn = preference_fields(record.preferences, None)
    args: list[Any] = [
        limit, 1 if withdrawn else 0, len(to_clear), len(to_set),
        validation.MAX_TOPIC_PREFERENCES_PER_USER,
        validation.MAX_CHANNEL_PREFERENCES_PER_USER,
        validation.MAX_SIGNAL_TOPICS_PER_USER,
        *to_clear, *itertools.chain.from_iterable(to_set.items()),
    ]  # fmt: skip
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
    for signal in record.signals:
        args += (signal.topic, repr(signal.weight), f"{signal.observed_at:.6f}")
    return args


#: What the import script's negative answers mean: the field and its per-user bound.
IMPORT_BOUNDS = {
    1: ("topic_preferences", validation.MAX_TOPIC_PREFERENCES_PER_USER),
    2: ("channel_preferences", validation.MAX_CHANNEL_PREFERENCES_PER_USER),
    3: ("signals", validation.MAX_SIGNAL_TOPICS_PER_USER),
}


def profile_write(reply: Any) -> ProfileWrite:
    """What ``lua/import_profile.lua``'s reply says it did with one record."""
    if reply == ERASED:
        return ProfileWrite(None, 0, erased=True)
    if int(reply) < 0:
        return ProfileWrite(None, 0, over_bound=IMPORT_BOUNDS[-int(reply)])
    refused, signals = divmod(int(reply), 3)
    kept = None if signals == 0 else signals == 2
    return ProfileWrite(signals_kept=kept, attributes_refused=refused)


# --- contacts -----------------------------------------------------------------------------

#: The contacts hash's field of when a channel was last used: "last|<channel>".
LAST_CONTACT = "last|"

#: The caps script's mark: the day every counter of the contacts hash belongs to. Named as a
#: "last|<channel>" field because versions before the mark read such fields as a channel's
#: last contact time, so they tolerate it during a rolling upgrade or a rollback (and no
#: channel can be called "~day").
DAY_MARK = LAST_CONTACT + "~day"


def consume_args(spend: ContactSpend) -> list[Any]:
    """``lua/consume_contacts.lua``'s ARGV."""
    out: list[Any] = [spend.day, repr(spend.now), spend.channel, *spend.caps]
    out += [int(spend.interruptive), spend.gap_seconds, COUNTERS_TTL_SECONDS, spend.slots]
    out += [spend.decision_id, spend.request_id, spend.request_id_ttl_seconds]
    out += [CARRY_SECONDS, DAY_MARK, len(spend.stale), *(LAST_CONTACT + ch for ch in spend.stale)]
    for offer_id, cap in spend.ranked:
        out += [offer_id, cap]
    return out


def consumed_offers(reply: Sequence[Any]) -> list[str]:
    """The caps script's answer: the offers it counted, or RequestTaken."""
    tag, *rest = (str(part) for part in reply)
    if tag == "!":
        raise RequestTaken(rest[0])
    return rest


# --- decoding a profile -------------------------------------------------------------------


def decode_claim(value: str) -> tuple[str, float | None]:
    """A request id's claim, "<decision_id>|<made at>": the decision, and when it was made
    (None when the claim holds no time)."""
    decision_id, _, made_at = value.partition("|")
    return decision_id, float(made_at) if made_at else None


def split_ts(value: str) -> tuple[str, float]:
    """A "<value>|<updated_at>" field: the value, and the time (0 when it holds none)."""
    head, _, ts = value.partition("|")
    return head, float(ts or 0)


def decode_profile(
    user_id: str,
    fields: dict[str, str],
    signals: dict[str, str],
    contacts: dict[str, str],
    cooldowns: dict[str, str],
    attributes: dict[str, str],
) -> Profile:
    """The profile as stored, in no particular order: Decide reads it on every request and
    needs no order; ``ProfileService`` sorts what it presents."""
    topics, channels, max_per_day, quiet, consent = _decode_profile_fields(fields)
    counters, last_contacts = _decode_contacts(contacts)
    return Profile(
        user_id=user_id,
        topic_preferences=tuple(topics),
        channel_preferences=tuple(channels),
        max_messages_per_day=max_per_day,
        quiet_hours=quiet,
        consent=consent,
        signals=tuple(_decode_signals(signals)),
        contact_counters=tuple(counters),
        last_contacts=tuple(last_contacts),
        cooldowns=tuple(_decode_cooldowns(cooldowns)),
        attributes=tuple(_decode_attributes(attributes)),
    )


def profile_reads(k: keys.UserKeys) -> list[tuple[str, str]]:
    """The commands that read a user's profile: its five hashes, in ``decode_profile``'s
    order (``decode_profile_replies`` reads their replies)."""
    return [
        ("HGETALL", k.profile),
        ("HGETALL", k.signals),
        ("HGETALL", k.contacts),
        ("HGETALL", k.cooldowns),
        ("HGETALL", k.attributes),
    ]


def decode_profile_replies(user_id: str, replies: Iterable[Any]) -> Profile:
    """The profile from the replies to ``profile_reads``."""
    return decode_profile(user_id, *(as_dict(reply) for reply in replies))


def _decode_profile_fields(
    fields: dict[str, str],
) -> tuple[list[TopicPreference], list[ChannelPreference], int, QuietHours | None, Consent]:
    """The profile hash: stances, channel choices, the customer's cap, quiet hours, consent."""
    topics: list[TopicPreference] = []
    channels: list[ChannelPreference] = []
    max_per_day = 0
    quiet: QuietHours | None = None
    consent = Consent()
    for name, value in fields.items():
        kind, _, key = name.partition(":")
        if kind == "t":
            stance, ts = split_ts(value)
            topics.append(TopicPreference(key, Stance(int(stance)), ts))
        elif kind == "c":
            opted_in, ts = split_ts(value)
            channels.append(ChannelPreference(key, opted_in == "1", ts))
        elif name == "max_per_day":
            max_per_day = int(value)
        elif name == "quiet":
            start, end, tz = value.split("|", 2)
            quiet = QuietHours(int(start), int(end), tz)
        elif name == "consent":
            given, ts = split_ts(value)
            consent = Consent(given == "1", ts)
    return topics, channels, max_per_day, quiet, consent


def _decode_signals(signals: dict[str, str]) -> list[Signal]:
    decoded = []
    for topic, value in signals.items():
        weight, _, observed = value.partition("|")
        decoded.append(Signal(topic, float(weight), float(observed)))
    return decoded


def _decode_contacts(
    contacts: dict[str, str],
) -> tuple[list[ContactCounter], list[tuple[str, float]]]:
    """The contacts hash (laid out in ``lua/consume_contacts.lua``): its counters, and when
    each channel was last used."""
    counters = []
    last_contacts = []
    for field, count in contacts.items():
        if field in ("spent", DAY_MARK):  # the caps script's notes (its last decisions,
            continue  # the day of the counters), not counters
        window, _, rest = field.partition("|")
        if window == "last":  # "last|<channel>" -> when that channel was last used
            last_contacts.append((rest, float(count)))
            continue
        channel, _, offer_id = rest.partition("|")
        counters.append(ContactCounter(channel, offer_id, int(count), float(window)))
    return counters, last_contacts


def _decode_cooldowns(cooldowns: dict[str, str]) -> list[Cooldown]:
    cooling = []
    for field, until in cooldowns.items():
        kind, _, name = field.partition(":")
        cooling.append(
            Cooldown(name if kind == "o" else "", name if kind == "t" else "", float(until))
        )
    return cooling


def _decode_attributes(attributes: dict[str, str]) -> list[Attribute]:
    facts = []
    for name, stored in attributes.items():
        source, updated_at, value = stored.split("|", 2)
        facts.append(Attribute(name, value, AttributeSource(int(source)), float(updated_at)))
    return facts
