"""Every rule a request must meet, in one place. Each function returns field violations;
``require`` raises them together so a caller sees every problem at once."""

from __future__ import annotations

import functools
import json
import math
import re
import zoneinfo
from collections.abc import Callable, Iterable, Sequence

from tactful.domain import (
    AttributesUpdate,
    DecideRequest,
    Offer,
    OutcomeReport,
    PreferencesUpdate,
    Segment,
    Signal,
)
from tactful.errors import FieldViolation, InvalidArgument

MAX_USER_ID_BYTES = 256
MAX_CANDIDATES = 1000
MAX_SLOTS = 10
MAX_CATEGORICAL_CONTEXT_ENTRIES = 64
# A data set's raw features, sent whole (issue 16: a hundred and more). Each is crossed with
# every candidate's offer and topics, so a Decide's work grows with them: a bound, not a goal.
MAX_NUMERIC_CONTEXT_ENTRIES = 128
MAX_CONTEXT_KEY_BYTES = 64
MAX_CONTEXT_VALUE_BYTES = 256
MAX_PLACEMENT_BYTES = 128
MAX_KEY_BYTES = 128  # request_id, outcome_id, decision_id
MAX_PREFERENCES = 256
MAX_SIGNALS = 256
MAX_SIGNAL_WEIGHT = 1e6
MAX_REWARD_VALUE = 1e3
MAX_MESSAGES_PER_DAY = 1000
MAX_PAGE_SIZE = 1000
MAX_ATTRIBUTES_PER_CALL = 64
MAX_ATTRIBUTES_PER_USER = 128  # enforced by the store, atomically with the merge
# Per user, also enforced by the store atomically with the write: what one user can grow to,
# so that every Decide for them reads a bounded profile (and no one user can make Redis slow
# for everyone).
MAX_TOPIC_PREFERENCES_PER_USER = 1000
MAX_CHANNEL_PREFERENCES_PER_USER = 1000
MAX_SIGNAL_TOPICS_PER_USER = 1000
MAX_ATTRIBUTE_VALUE_CHARS = 256
MAX_SEGMENTS_PER_OFFER = 32  # in segments and in excluded_segments, each
# An offer's topics and channels: every topic adds features to each Decide that scores the
# offer, and without a bound a large list would hit the receive-message limit
# (RESOURCE_EXHAUSTED) before a clear INVALID_ARGUMENT.
MAX_TOPICS_PER_OFFER = 32
MAX_CHANNELS_PER_OFFER = 32
MAX_SEGMENT_DESCRIPTION_CHARS = 1000
FUTURE_SKEW_SECONDS = 300.0
# google.protobuf.Timestamp's valid range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
MIN_TIMESTAMP, MAX_TIMESTAMP = -62_135_596_800, 253_402_300_799

CHANNEL_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
TOPIC_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
OFFER_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
# Offer ids one after another, each ended by a newline (which no id may contain): up to
# 1,000 candidates of a Decide checked in one match, not one match each.
# Possessive: a bad id fails at once, never retried against the ids before it.
_OFFER_IDS_RE = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9._:-]{0,127}+\n)*+")
SEGMENT_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
ATTRIBUTE_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
CONTROL_CHAR_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc

Violations = list[FieldViolation]


def require(violations: Violations) -> None:
    if violations:
        raise InvalidArgument(violations)


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def check_user_id(user_id: str, field: str = "user_id") -> Violations:
    if not user_id:
        return [FieldViolation(field, "must not be empty")]
    if _utf8_len(user_id) > MAX_USER_ID_BYTES:
        return [FieldViolation(field, f"must be at most {MAX_USER_ID_BYTES} bytes")]
    return []


def _check_pattern(value: str, pattern: re.Pattern[str], field: str, what: str) -> Violations:
    if not value:
        return [FieldViolation(field, "must not be empty")]
    if not pattern.fullmatch(value):
        return [FieldViolation(field, f"{value[:40]!r} is not a valid {what}")]
    return []


def check_channel(channel: str, field: str = "channel") -> Violations:
    return _check_pattern(
        channel, CHANNEL_RE, field, "channel (a-z, 0-9, '_', '-', starting with a letter, <= 32)"
    )


def check_topic(topic: str, field: str) -> Violations:
    return _check_pattern(topic, TOPIC_RE, field, "topic (a-z, 0-9, '_', '-', <= 64)")


def check_offer_id(offer_id: str, field: str = "offer_id") -> Violations:
    return _check_pattern(
        offer_id, OFFER_ID_RE, field, "offer id (A-Z, a-z, 0-9, '.', '_', ':', '-', <= 128)"
    )


def check_segment_id(segment_id: str, field: str = "segment_id") -> Violations:
    return _check_pattern(
        segment_id, SEGMENT_ID_RE, field, "segment id (A-Z, a-z, 0-9, '.', '_', ':', '-', <= 64)"
    )


def check_segment(segment: Segment) -> Violations:
    """The id and description of a PutSegment; the rule is parsed by the core (with the
    limits from settings), which names the position of any problem."""
    out = check_segment_id(segment.segment_id, "segment.segment_id")
    if not segment.rule.strip():
        out.append(FieldViolation("segment.rule", "must not be empty"))
    if len(segment.description) > MAX_SEGMENT_DESCRIPTION_CHARS:
        out.append(
            FieldViolation(
                "segment.description",
                f"must be at most {MAX_SEGMENT_DESCRIPTION_CHARS} characters",
            )
        )
    elif CONTROL_CHAR_RE.search(segment.description.replace("\n", "").replace("\t", "")):
        out.append(
            FieldViolation("segment.description", "must not hold control characters but \\n, \\t")
        )
    return out


def _check_offer_segments(offer: Offer) -> Violations:
    out: Violations = []
    for name, ids in (("segments", offer.segments), ("excluded_segments", offer.excluded_segments)):
        if len(ids) > MAX_SEGMENTS_PER_OFFER:
            out.append(FieldViolation(f"offer.{name}", f"at most {MAX_SEGMENTS_PER_OFFER} entries"))
            continue
        seen: set[str] = set()
        for i, segment_id in enumerate(ids):
            field = f"offer.{name}[{i}]"
            out += check_segment_id(segment_id, field)
            if segment_id in seen:
                out.append(FieldViolation(field, "given twice"))
            seen.add(segment_id)
    both = set(offer.segments) & set(offer.excluded_segments)
    for i, segment_id in enumerate(offer.excluded_segments):
        if segment_id in both:
            out.append(
                FieldViolation(
                    f"offer.excluded_segments[{i}]",
                    "is also in offer.segments: the offer could reach no one through it",
                )
            )
    return out


def _check_key(value: str, field: str, *, required: bool) -> Violations:
    if not value:
        return [FieldViolation(field, "must not be empty")] if required else []
    if _utf8_len(value) > MAX_KEY_BYTES:
        return [FieldViolation(field, f"must be at most {MAX_KEY_BYTES} bytes")]
    return []


def _check_finite(value: float, field: str) -> Violations:
    if not math.isfinite(value):
        return [FieldViolation(field, "must be a finite number (not NaN or infinite)")]
    return []


def check_timestamp(seconds: float | None, field: str) -> Violations:
    if seconds is not None and not MIN_TIMESTAMP <= seconds <= MAX_TIMESTAMP:
        return [FieldViolation(field, "must be a Timestamp between years 0001 and 9999")]
    return []


def _check_context_key(key: str, field: str) -> Violations:
    if not key or _utf8_len(key) > MAX_CONTEXT_KEY_BYTES:
        return [FieldViolation(field, f"keys must be 1 to {MAX_CONTEXT_KEY_BYTES} bytes")]
    return []


def check_decide(req: DecideRequest) -> Violations:
    out = check_user_id(req.user_id) + check_channel(req.channel)
    if _utf8_len(req.placement) > MAX_PLACEMENT_BYTES:
        out.append(FieldViolation("placement", f"must be at most {MAX_PLACEMENT_BYTES} bytes"))
    for name, entries, most in (
        ("numeric_context", req.numeric_context, MAX_NUMERIC_CONTEXT_ENTRIES),
        ("categorical_context", req.categorical_context, MAX_CATEGORICAL_CONTEXT_ENTRIES),
    ):
        if len(entries) > most:
            out.append(FieldViolation(name, f"at most {most} entries"))
    for key, number in req.numeric_context:
        out += _check_context_key(key, f"numeric_context[{key[:40]!r}]")
        out += _check_finite(number, f"numeric_context[{key[:40]!r}]")
    for key, text in req.categorical_context:
        out += _check_context_key(key, f"categorical_context[{key[:40]!r}]")
        if _utf8_len(text) > MAX_CONTEXT_VALUE_BYTES:
            out.append(
                FieldViolation(
                    f"categorical_context[{key[:40]!r}]",
                    f"values must be at most {MAX_CONTEXT_VALUE_BYTES} bytes",
                )
            )
    if len(req.candidate_offer_ids) > MAX_CANDIDATES:
        out.append(FieldViolation("candidate_offer_ids", f"at most {MAX_CANDIDATES} candidates"))
    elif not _all_offer_ids(req.candidate_offer_ids):
        # Only a request with a bad id pays for naming each violation (the pattern admits no
        # empty id, so an empty one lands here too).
        for i, offer_id in enumerate(req.candidate_offer_ids):
            out += check_offer_id(offer_id, f"candidate_offer_ids[{i}]")
    if not 0 <= req.slots <= MAX_SLOTS:
        out.append(FieldViolation("slots", f"must be between 0 and {MAX_SLOTS}"))
    out += _check_key(req.request_id, "request_id", required=False)
    return out


def _all_offer_ids(ids: Sequence[str]) -> bool:
    """Whether every one of ``ids`` matches OFFER_ID_RE. An id holding a newline itself would
    read as two: such a line count is no match either."""
    if not ids:
        return True
    lines = "\n".join(ids) + "\n"
    return lines.count("\n") == len(ids) and _OFFER_IDS_RE.fullmatch(lines) is not None


def check_outcome(report: OutcomeReport) -> Violations:
    out = _check_key(report.decision_id, "decision_id", required=True)
    out += check_offer_id(report.offer_id)
    if report.event is None:
        out.append(FieldViolation("event", "must be a known OutcomeEvent other than UNSPECIFIED"))
    out += _check_key(report.outcome_id, "outcome_id", required=True)
    if report.value is not None and not (
        math.isfinite(report.value) and abs(report.value) <= MAX_REWARD_VALUE
    ):
        # One absurd reward would swamp the model for every user: bound it.
        out.append(FieldViolation("value", f"must be a finite number within ±{MAX_REWARD_VALUE:g}"))
    return out


def check_preferences(update: PreferencesUpdate) -> Violations:
    out = check_user_id(update.user_id)
    if len(update.topic_preferences) > MAX_PREFERENCES:
        out.append(FieldViolation("topic_preferences", f"at most {MAX_PREFERENCES} entries"))
    seen: set[str] = set()
    for i, pref in enumerate(update.topic_preferences):
        if not TOPIC_RE.fullmatch(pref.topic):  # the field path only for a bad one
            out += check_topic(pref.topic, f"topic_preferences[{i}].topic")
        if pref.topic in seen:
            out.append(FieldViolation(f"topic_preferences[{i}].topic", "given twice"))
        seen.add(pref.topic)
        if pref.stance is None:
            out.append(
                FieldViolation(f"topic_preferences[{i}].stance", "must be LIKE, DISLIKE or NEUTRAL")
            )
    if len(update.channel_preferences) > MAX_PREFERENCES:
        out.append(FieldViolation("channel_preferences", f"at most {MAX_PREFERENCES} entries"))
    seen.clear()
    for i, channel_pref in enumerate(update.channel_preferences):
        if not CHANNEL_RE.fullmatch(channel_pref.channel):
            out += check_channel(channel_pref.channel, f"channel_preferences[{i}].channel")
        if channel_pref.channel in seen:
            out.append(FieldViolation(f"channel_preferences[{i}].channel", "given twice"))
        seen.add(channel_pref.channel)
    if update.max_messages_per_day is not None and not (
        0 <= update.max_messages_per_day <= MAX_MESSAGES_PER_DAY
    ):
        out.append(
            FieldViolation("max_messages_per_day", f"must be between 0 and {MAX_MESSAGES_PER_DAY}")
        )
    if update.quiet_hours is not None:
        quiet = update.quiet_hours
        for name, hour in (("start_hour", quiet.start_hour), ("end_hour", quiet.end_hour)):
            if not 0 <= hour <= 23:
                out.append(FieldViolation(f"quiet_hours.{name}", "must be between 0 and 23"))
        out += check_time_zone(quiet.time_zone, "quiet_hours.time_zone")
    return out


@functools.cache
def _time_zones() -> frozenset[str]:
    """The IANA names installed (system zoneinfo and the tzdata package), read once."""
    return frozenset(zoneinfo.available_timezones())


def attribute_field(name: str) -> str:
    """The field path of one map entry, e.g. ``attributes["country"]`` (quoted as JSON, so
    any name, even a hostile one, gives a readable and unambiguous path)."""
    return f"attributes[{json.dumps(name[:40])}]"


def check_attributes(update: AttributesUpdate) -> Violations:
    """Names, values and the source of a SetAttributes call. The cap on a user's attributes
    (``MAX_ATTRIBUTES_PER_USER``) depends on what is stored: the store checks it with the
    merge."""
    out = check_user_id(update.user_id)
    if update.source is None:
        out.append(FieldViolation("source", "must be STATED or IMPORTED"))
    if len(update.attributes) > MAX_ATTRIBUTES_PER_CALL:
        out.append(FieldViolation("attributes", f"at most {MAX_ATTRIBUTES_PER_CALL} entries"))
        return out
    for name, value in update.attributes:
        if (
            ATTRIBUTE_NAME_RE.fullmatch(name)
            and len(value) <= MAX_ATTRIBUTE_VALUE_CHARS
            and not CONTROL_CHAR_RE.search(value)
        ):
            continue  # a good entry (most are) costs no field path
        field = attribute_field(name)
        out += _check_pattern(
            name,
            ATTRIBUTE_NAME_RE,
            field,
            "attribute name (a-z, 0-9, '_', starting with a letter, <= 64)",
        )
        if len(value) > MAX_ATTRIBUTE_VALUE_CHARS:
            out.append(
                FieldViolation(
                    field, f"values must be at most {MAX_ATTRIBUTE_VALUE_CHARS} characters"
                )
            )
        elif CONTROL_CHAR_RE.search(value):
            out.append(FieldViolation(field, "values must not hold control characters"))
    return out


def check_time_zone(name: str, field: str) -> Violations:
    if not name:
        return [FieldViolation(field, "must name an IANA time zone, e.g. Europe/Paris")]
    # A name is looked up in the list of zones, never opened as a path: ZoneInfo(name) reads a
    # file named after it and fails with OSError on a directory ("America") or a long name.
    if name not in _time_zones():
        return [FieldViolation(field, f"{name[:40]!r} is not a known IANA time zone")]
    return []


def check_signals(user_id: str, signals: Iterable[Signal], now: float) -> Violations:
    out = check_user_id(user_id)
    signals = list(signals)
    if not signals:
        out.append(FieldViolation("signals", "must not be empty"))
    if len(signals) > MAX_SIGNALS:
        out.append(FieldViolation("signals", f"at most {MAX_SIGNALS} entries"))
        return out
    for i, signal in enumerate(signals):
        if not TOPIC_RE.fullmatch(signal.topic):
            out += check_topic(signal.topic, f"signals[{i}].topic")
        if not math.isfinite(signal.weight) or not 0 <= signal.weight <= MAX_SIGNAL_WEIGHT:
            out.append(
                FieldViolation(
                    f"signals[{i}].weight", f"must be between 0 and {MAX_SIGNAL_WEIGHT:g}"
                )
            )
        out += check_timestamp(signal.observed_at, f"signals[{i}].observed_at")
        if signal.observed_at > now + FUTURE_SKEW_SECONDS:
            out.append(FieldViolation(f"signals[{i}].observed_at", "must not be in the future"))
    return out


def _check_names(
    names: Sequence[str],
    field: str,
    what: str,
    limit: int,
    check: Callable[[str, str], Violations],
) -> Violations:
    """A list of names an offer needs at least one of (its topics, its channels): each name
    is checked only when the list's length is in bounds."""
    if not names:
        return [FieldViolation(field, f"must name at least one {what}")]
    if len(names) > limit:
        return [FieldViolation(field, f"at most {limit} entries")]
    out: Violations = []
    for i, name in enumerate(names):
        out += check(name, f"{field}[{i}]")
    return out


def check_offer(offer: Offer) -> Violations:
    out = check_offer_id(offer.offer_id, "offer.offer_id")
    if not offer.title.strip():
        out.append(FieldViolation("offer.title", "must not be empty"))
    elif len(offer.title) > 200:
        out.append(FieldViolation("offer.title", "must be at most 200 characters"))
    out += _check_names(offer.topics, "offer.topics", "topic", MAX_TOPICS_PER_OFFER, check_topic)
    out += _check_names(
        offer.channels, "offer.channels", "channel", MAX_CHANNELS_PER_OFFER, check_channel
    )
    if not math.isfinite(offer.priority) or offer.priority < 0:
        out.append(FieldViolation("offer.priority", "must be a finite number >= 0"))
    if offer.max_per_user_per_day < 0:
        out.append(FieldViolation("offer.max_per_user_per_day", "must be >= 0"))
    out += check_timestamp(offer.start_time, "offer.start_time")
    out += check_timestamp(offer.end_time, "offer.end_time")
    if (
        offer.start_time is not None
        and offer.end_time is not None
        and offer.end_time <= offer.start_time
    ):
        out.append(FieldViolation("offer.end_time", "must be after start_time"))
    out += _check_offer_segments(offer)
    return out


def check_page(page_size: int) -> Violations:
    if not 0 <= page_size <= MAX_PAGE_SIZE:
        return [FieldViolation("page_size", f"must be between 0 and {MAX_PAGE_SIZE}")]
    return []
