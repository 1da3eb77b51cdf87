"""Bulk import and export of profiles: ``tactful import FILE`` and
``tactful export --profiles FILE`` (``-`` for stdin / stdout), one JSON object per line::

    {"user_id": "u1",
     "attributes": {"country": "FR",
                    "persona": {"value": "runner", "source": "STATED",
                                "updated_at": "2026-11-20T10:00:00Z"}},
     "topic_preferences": [{"topic": "running", "stance": "LIKE"}],
     "channel_preferences": [{"channel": "email", "opted_in": false}],
     "max_messages_per_day": 3,
     "quiet_hours": {"start_hour": 22, "end_hour": 7, "time_zone": "Europe/Paris"},
     "consent": {"inferred_personalization": true},
     "signals": [{"topic": "yoga", "weight": 2.5, "observed_at": "2026-11-20T10:00:00Z"}]}

Only ``user_id`` is required; a field left out leaves what is stored as it is (a merge, as
the API merges). An attribute is a string (its source is then ``IMPORTED``: a file is a
system of record) or an object with ``value``, ``source`` (``STATED`` or ``IMPORTED``) and
``updated_at``; an empty value removes it. Stances are ``LIKE``, ``DISLIKE`` or ``NEUTRAL``
(clears). Times are ISO 8601 (UTC unless they say otherwise) or epoch seconds; an
``updated_at`` or ``observed_at`` left out is the time the import started. Every line is
checked by the API's own rules (``validation``): a bad line is reported as
``line N: <field>: <problem>`` and skipped, and the import goes on.

The semantics are the API's, by the store's own code: attributes go through SetAttributes'
script (an ``IMPORTED`` value never replaces or removes a ``STATED`` one; at most
``MAX_ATTRIBUTES_PER_USER`` per user), signals through RecordSignals' script (kept only for a
user whose stored or imported consent is given; withdrawing consent deletes them).

Idempotent: importing a file twice leaves the same state. RecordSignals *adds* observations
(a weight decayed to the newest one), so an import that added would double the signals on a
second run; a line's signals are instead the user's signal *state* (weight at observed_at,
what GetProfile and the export show, undecayed), and each replaces the stored value of its
topic (a topic given twice in a line is refused). Everything else is set, not added. Times
the file gives are kept, so a re-run is byte-for-byte the same; times it leaves out are the
run's start, so only they move.

The export writes every profile in this format, every time included, so export -> import
into an empty Redis gives the same profiles. Contact counters, cooldowns and decisions are
operational state and are not carried. User ids are kept (field ``user_id`` of the profile
hash, written by SetPreferences, SetAttributes and the import) because keys only hold a
digest: a profile last written before that field existed has no user id and is counted,
not exported (any write through the API or an import gives it one).
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TextIO

import orjson

from tactful import validation
from tactful.domain import (
    Attribute,
    AttributeSource,
    AttributesUpdate,
    ChannelPreference,
    Consent,
    PreferencesUpdate,
    Profile,
    ProfileRecord,
    QuietHours,
    Signal,
    Stance,
    TopicPreference,
)
from tactful.errors import FieldViolation, InvalidArgument, Unavailable
from tactful.store import ProfileWrite
from tactful.store.redis_store import RedisStore
from tactful.store.wire import STORE_DOWN_ERRORS

#: Users per pipeline, one round trip each (measured: batches of 100 to 2,000 load at about the
#: same rate; 500 typical users are a few hundred kB of commands).
DEFAULT_BATCH = 500

FIELDS = frozenset(
    {
        "user_id",
        "attributes",
        "topic_preferences",
        "channel_preferences",
        "max_messages_per_day",
        "quiet_hours",
        "consent",
        "signals",
    }
)


@dataclass(frozen=True, slots=True)
class _Shape:
    """The fields an object of a line must have, and those it may have."""

    required: tuple[str, ...]
    allowed: frozenset[str]


def _shape(required: tuple[str, ...], optional: tuple[str, ...] = ()) -> _Shape:
    return _Shape(required, frozenset(required + optional))


_TOPIC = _shape(("topic", "stance"), ("updated_at",))
_CHANNEL = _shape(("channel", "opted_in"), ("updated_at",))
_SIGNAL = _shape(("topic", "weight"), ("observed_at",))
_QUIET = _shape(("start_hour", "end_hour", "time_zone"))
_CONSENT = _shape(("inferred_personalization",), ("updated_at",))
_ATTRIBUTE = _shape(("value",), ("source", "updated_at"))
_STANCES = {"LIKE": Stance.LIKE, "DISLIKE": Stance.DISLIKE, "NEUTRAL": Stance.NEUTRAL}
_SOURCES = {"STATED": AttributeSource.STATED, "IMPORTED": AttributeSource.IMPORTED}
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_MICROSECOND = datetime.timedelta(microseconds=1)

Violations = validation.Violations

#: What a bulk command reports as "the store is unavailable" (the store's own and the client's).
STORE_ERRORS: tuple[type[Exception], ...] = (Unavailable, *STORE_DOWN_ERRORS)


# --- reading a line ------------------------------------------------------------------------


def parse_line(raw: bytes | str, now: float) -> ProfileRecord:
    """One line as a validated record, or ``InvalidArgument`` with every problem found:
    first its shape (JSON types, unknown fields), then, if the shape is right, the API's
    rules. ``now`` stamps what the line gives no time for."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgument(
            [FieldViolation("", f"not valid JSON ({exc.msg}, column {exc.colno})")]
        ) from None
    if not isinstance(data, dict):
        raise InvalidArgument([FieldViolation("", "must be a JSON object")])
    record = _fast_record(data, now)
    if record is not None:
        return record
    return _general_record(data, now)


def _general_record(data: dict[str, Any], now: float) -> ProfileRecord:
    """A decoded line as a record by the general path, or ``InvalidArgument`` with every
    problem found."""
    reader = _Reader(now)
    record = reader.record(data)
    validation.require(reader.out)
    validation.require(_check(record, now))
    return record


# --- the common line, checked at once ------------------------------------------------------
#
# Most lines are right, and the general path (``_Reader`` noting every problem with its field
# path, then ``_check`` running the API's rules on the records built) costs most of the
# importer's time. ``_fast_record`` checks a line's values in one pass by the same rules and
# builds its record; at the first thing it does not accept (a problem, or a shape it does not
# handle) it returns None and the line takes the general path, which reports what is wrong
# exactly as before. So it may only return a record the general path would return, equal to
# it (tests/test_import.py compares the two on good and bad lines).

_TIME_ZONES: frozenset[str] | None = None
_ISO_TIMES: dict[str, float] = {}  # text -> epoch seconds: a file repeats its times


class _Refused(Exception):
    """A line ``_fast_record`` leaves to the general path."""


def _fast_time(value: Any, now: float) -> float:
    """``_Reader.time``, for a value it accepts."""
    if value is None:
        return now
    if type(value) is str:
        seconds = _ISO_TIMES.get(value)
        if seconds is None:
            try:
                when = datetime.datetime.fromisoformat(value)
            except ValueError:
                raise _Refused from None
            if when.tzinfo is None:
                when = when.replace(tzinfo=datetime.UTC)
            seconds = ((when - _EPOCH) // _MICROSECOND) / 1e6
            if len(_ISO_TIMES) >= 4096:
                _ISO_TIMES.clear()
            _ISO_TIMES[value] = seconds
        return seconds
    if type(value) is float:
        return value
    if type(value) is int:
        try:
            return float(value)
        except OverflowError:
            raise _Refused from None
    raise _Refused


def _fast_updated_at(value: Any, now: float) -> float:
    """``_Reader.updated_at``, for a value it accepts."""
    if value is None:
        return now
    at = _fast_time(value, now)
    if not validation.MIN_TIMESTAMP <= at <= now + validation.FUTURE_SKEW_SECONDS:
        raise _Refused
    return at


_TOPIC_FIELDS = _TOPIC.allowed
_CHANNEL_FIELDS = _CHANNEL.allowed
_SIGNAL_FIELDS = _SIGNAL.allowed
_CONSENT_FIELDS = _CONSENT.allowed
_ATTRIBUTE_FIELDS = _ATTRIBUTE.allowed
_QUIET_FIELDS = _QUIET.allowed


def _fast_record(data: dict[str, Any], now: float) -> ProfileRecord | None:
    """The record of a line the general path accepts, checked by the same rules in one pass;
    None for anything else (see above)."""
    try:
        return _fast_checked(data, now)
    except _Refused:
        return None


def _fast_checked(data: dict[str, Any], now: float) -> ProfileRecord:
    global _TIME_ZONES
    if not data.keys() <= FIELDS:
        raise _Refused
    user_id = data.get("user_id")
    if type(user_id) is not str or not user_id:
        raise _Refused
    if len(user_id) * 4 > validation.MAX_USER_ID_BYTES and (
        validation._utf8_len(user_id) > validation.MAX_USER_ID_BYTES
    ):
        raise _Refused
    max_per_day = data.get("max_messages_per_day")
    if "max_messages_per_day" in data and (
        type(max_per_day) is not int or not 0 <= max_per_day <= validation.MAX_MESSAGES_PER_DAY
    ):
        raise _Refused
    quiet = None
    if "quiet_hours" in data:
        value = data["quiet_hours"]
        if type(value) is not dict or value.keys() != _QUIET_FIELDS:
            raise _Refused
        start, end, zone = value["start_hour"], value["end_hour"], value["time_zone"]
        if type(start) is not int or type(end) is not int or type(zone) is not str:
            raise _Refused
        if _TIME_ZONES is None:
            _TIME_ZONES = validation._time_zones()
        if not (0 <= start <= 23 and 0 <= end <= 23 and zone in _TIME_ZONES):
            raise _Refused
        quiet = QuietHours(start, end, zone)
    consent = None
    if "consent" in data:
        value = data["consent"]
        if type(value) is not dict or not value.keys() <= _CONSENT_FIELDS:
            raise _Refused
        given = value.get("inferred_personalization")
        if type(given) is not bool:
            raise _Refused
        consent = Consent(given, _fast_updated_at(value.get("updated_at"), now))
    topics: tuple[TopicPreference, ...] = ()
    if "topic_preferences" in data:
        value = data["topic_preferences"]
        if type(value) is not list or len(value) > validation.MAX_PREFERENCES:
            raise _Refused
        seen: set[str] = set()
        built_topics = []
        for item in value:
            if type(item) is not dict or not item.keys() <= _TOPIC_FIELDS:
                raise _Refused
            topic, stance = item.get("topic"), item.get("stance")
            if (
                type(topic) is not str
                or type(stance) is not str
                or stance not in _STANCES
                or topic in seen
                or not validation.TOPIC_RE.fullmatch(topic)
            ):
                raise _Refused
            seen.add(topic)
            at = _fast_updated_at(item.get("updated_at"), now)
            built_topics.append(TopicPreference(topic, _STANCES[stance], at))
        topics = tuple(built_topics)
    channels: tuple[ChannelPreference, ...] = ()
    if "channel_preferences" in data:
        value = data["channel_preferences"]
        if type(value) is not list or len(value) > validation.MAX_PREFERENCES:
            raise _Refused
        seen = set()
        built_channels = []
        for item in value:
            if type(item) is not dict or not item.keys() <= _CHANNEL_FIELDS:
                raise _Refused
            channel, opted_in = item.get("channel"), item.get("opted_in")
            if (
                type(channel) is not str
                or type(opted_in) is not bool
                or channel in seen
                or not validation.CHANNEL_RE.fullmatch(channel)
            ):
                raise _Refused
            seen.add(channel)
            at = _fast_updated_at(item.get("updated_at"), now)
            built_channels.append(ChannelPreference(channel, opted_in, at))
        channels = tuple(built_channels)
    signals: tuple[Signal, ...] = ()
    if "signals" in data:
        value = data["signals"]
        if type(value) is not list or len(value) > validation.MAX_SIGNALS:
            raise _Refused
        seen = set()
        built_signals = []
        latest = now + validation.FUTURE_SKEW_SECONDS
        for item in value:
            if type(item) is not dict or not item.keys() <= _SIGNAL_FIELDS:
                raise _Refused
            topic, weight = item.get("topic"), item.get("weight")
            if type(weight) is int:
                try:
                    weight = float(weight)
                except OverflowError:
                    raise _Refused from None
            elif type(weight) is not float:
                raise _Refused
            if (
                type(topic) is not str
                or topic in seen
                or not validation.TOPIC_RE.fullmatch(topic)
                or not 0 <= weight <= validation.MAX_SIGNAL_WEIGHT  # False for NaN
            ):
                raise _Refused
            seen.add(topic)
            observed = _fast_time(item.get("observed_at"), now)
            if not validation.MIN_TIMESTAMP <= observed <= validation.MAX_TIMESTAMP:
                raise _Refused
            if observed > latest:
                raise _Refused
            built_signals.append(Signal(topic, weight, observed))
        signals = tuple(built_signals)
    attributes: tuple[Attribute, ...] = ()
    if "attributes" in data:
        value = data["attributes"]
        if type(value) is not dict or len(value) > validation.MAX_ATTRIBUTES_PER_USER:
            raise _Refused
        built_attributes = []
        name_ok, control = validation.ATTRIBUTE_NAME_RE.fullmatch, validation.CONTROL_CHAR_RE
        for name, spec in value.items():
            if type(spec) is str:
                text, source, at = spec, AttributeSource.IMPORTED, now
            elif type(spec) is dict and spec.keys() <= _ATTRIBUTE_FIELDS:
                given, source_name = spec.get("value"), spec.get("source", "IMPORTED")
                if type(given) is not str or type(source_name) is not str:
                    raise _Refused
                if source_name not in _SOURCES:
                    raise _Refused
                text, source = given, _SOURCES[source_name]
                at = _fast_updated_at(spec.get("updated_at"), now)
            else:
                raise _Refused
            if (
                len(text) > validation.MAX_ATTRIBUTE_VALUE_CHARS
                or not name_ok(name)
                or control.search(text)
            ):
                raise _Refused
            built_attributes.append(Attribute(name, text, source, at))
        attributes = tuple(built_attributes)
    preferences = PreferencesUpdate(user_id, topics, channels, max_per_day, quiet, consent)
    return ProfileRecord(user_id, preferences, attributes, signals)


class _Reader:
    """Turns a decoded line into domain objects, noting every value of the wrong type. Field
    paths (``signals[0].weight``) are only built for a value found wrong: most lines are
    right, and this runs for every line."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.out: Violations = []

    def bad(self, field: str, name: str, problem: str) -> None:
        self.out.append(FieldViolation(f"{field}.{name}" if field else name, problem))

    def record(self, data: dict[str, Any]) -> ProfileRecord:
        if not data.keys() <= FIELDS:
            for name in sorted(data.keys() - FIELDS):
                self.bad("", json.dumps(name[:40]), "is not a field of a profile line")
        user_id = data.get("user_id", "")
        if type(user_id) is not str:
            self.bad("", "user_id", "must be a string")
            user_id = ""
        consent = quiet = max_per_day = None
        if "max_messages_per_day" in data:
            max_per_day = self.integer(data["max_messages_per_day"], "", "max_messages_per_day")
        if "quiet_hours" in data:
            quiet = self.quiet_hours(data["quiet_hours"])
        if "consent" in data:
            consent = self.consent(data["consent"])
        topics: tuple[TopicPreference, ...] = ()
        channels: tuple[ChannelPreference, ...] = ()
        signals: tuple[Signal, ...] = ()
        attributes: tuple[Attribute, ...] = ()
        if "topic_preferences" in data:
            topics = self.items(data["topic_preferences"], "topic_preferences", _TOPIC, self.topic)
        if "channel_preferences" in data:
            channels = self.items(
                data["channel_preferences"], "channel_preferences", _CHANNEL, self.channel
            )
        if "signals" in data:
            signals = self.items(data["signals"], "signals", _SIGNAL, self.signal)
        if "attributes" in data:
            attributes = self.attributes(data["attributes"])
        preferences = PreferencesUpdate(user_id, topics, channels, max_per_day, quiet, consent)
        return ProfileRecord(user_id, preferences, attributes, signals)

    # Values.

    def integer(self, value: Any, field: str, name: str) -> int:
        if type(value) is not int:  # not a bool, not 3.0
            self.bad(field, name, "must be an integer")
            return 0
        return value

    def string(self, value: Any, field: str, name: str) -> str:
        if type(value) is not str:
            self.bad(field, name, "must be a string")
            return ""
        return value

    def boolean(self, value: Any, field: str, name: str) -> bool:
        if type(value) is not bool:
            self.bad(field, name, "must be true or false")
            return False
        return value

    def time(self, value: Any, field: str, name: str) -> float:
        """A time given as ISO 8601 text or epoch seconds; ``now`` when not given."""
        if value is None:
            return self.now
        if type(value) is str:
            try:
                when = datetime.datetime.fromisoformat(value)
            except ValueError:
                self.bad(field, name, f"{value[:40]!r} is not an ISO 8601 time")
                return self.now
            if when.tzinfo is None:
                when = when.replace(tzinfo=datetime.UTC)
            # Exact to the microsecond, as the store keeps times.
            return ((when - _EPOCH) // _MICROSECOND) / 1e6
        if type(value) in (int, float):
            try:
                return float(value)
            except OverflowError:
                pass
        self.bad(field, name, "must be an ISO 8601 time or epoch seconds")
        return self.now

    def updated_at(self, value: Any, field: str) -> float:
        if value is None:
            return self.now
        at = self.time(value, field, "updated_at")
        if not validation.MIN_TIMESTAMP <= at <= self.now + validation.FUTURE_SKEW_SECONDS:
            self.bad(field, "updated_at", "must be a time between year 0001 and now")
        return at

    def fields(self, value: Any, field: str, shape: _Shape) -> dict[str, Any] | None:
        """An object with every required field and no field it may not have (None, and
        noted, otherwise)."""
        if type(value) is not dict:
            self.out.append(FieldViolation(field, "must be an object"))
            return None
        ok = True
        if not value.keys() <= shape.allowed:
            for name in sorted(value.keys() - shape.allowed):
                self.bad(field, name[:40], "is not a field here")
        for name in shape.required:
            if name not in value:
                self.bad(field, name, "is required")
                ok = False
        return value if ok else None

    # Parts of a line.

    def items(
        self, value: Any, name: str, shape: _Shape, build: Callable[[dict[str, Any], str], Any]
    ) -> tuple[Any, ...]:
        if type(value) is not list:
            self.bad("", name, "must be a list")
            return ()
        built = []
        for i, item in enumerate(value):
            field = f"{name}[{i}]"
            fields = self.fields(item, field, shape)
            if fields is not None:
                built.append(build(fields, field))
        return tuple(built)

    def topic(self, item: dict[str, Any], field: str) -> TopicPreference:
        stance = item["stance"]
        return TopicPreference(
            self.string(item["topic"], field, "topic"),
            _STANCES.get(stance) if type(stance) is str else None,  # None: reported
            self.updated_at(item.get("updated_at"), field),
        )

    def channel(self, item: dict[str, Any], field: str) -> ChannelPreference:
        return ChannelPreference(
            self.string(item["channel"], field, "channel"),
            self.boolean(item["opted_in"], field, "opted_in"),
            self.updated_at(item.get("updated_at"), field),
        )

    def signal(self, item: dict[str, Any], field: str) -> Signal:
        weight = item["weight"]
        if type(weight) is int:
            try:
                weight = float(weight)
            except OverflowError:
                weight = math.inf  # reported by the API's range check
        elif type(weight) is not float:
            self.bad(field, "weight", "must be a number")
            weight = 0.0
        return Signal(
            self.string(item["topic"], field, "topic"),
            weight,
            self.time(item.get("observed_at"), field, "observed_at"),
        )

    def quiet_hours(self, value: Any) -> QuietHours | None:
        fields = self.fields(value, "quiet_hours", _QUIET)
        if fields is None:
            return None
        return QuietHours(
            self.integer(fields["start_hour"], "quiet_hours", "start_hour"),
            self.integer(fields["end_hour"], "quiet_hours", "end_hour"),
            self.string(fields["time_zone"], "quiet_hours", "time_zone"),
        )

    def consent(self, value: Any) -> Consent | None:
        fields = self.fields(value, "consent", _CONSENT)
        if fields is None:
            return None
        return Consent(
            self.boolean(fields["inferred_personalization"], "consent", "inferred_personalization"),
            self.updated_at(fields.get("updated_at"), "consent"),
        )

    def attributes(self, value: Any) -> tuple[Attribute, ...]:
        if type(value) is not dict:
            self.bad("", "attributes", "must be an object of name: value")
            return ()
        out = []
        for name, spec in value.items():
            if type(spec) is str:
                out.append(Attribute(name, spec, AttributeSource.IMPORTED, self.now))
                continue
            field = validation.attribute_field(name)
            fields = self.fields(spec, field, _ATTRIBUTE)
            if fields is None:
                continue
            source = fields.get("source", "IMPORTED")
            if source not in _SOURCES:
                self.bad(field, "source", "must be STATED or IMPORTED")
            out.append(
                Attribute(
                    name,
                    self.string(fields["value"], field, "value"),
                    _SOURCES.get(source, AttributeSource.IMPORTED),
                    self.updated_at(fields.get("updated_at"), field),
                )
            )
        return tuple(out)


def _check(record: ProfileRecord, now: float) -> Violations:
    """The API's rules: SetPreferences', SetAttributes' (in chunks of what one call may
    carry, up to what one user may hold) and RecordSignals', with the user id checked once."""
    out = validation.check_preferences(record.preferences)
    attributes = [(a.name, a.value) for a in record.attributes]
    if len(attributes) > validation.MAX_ATTRIBUTES_PER_USER:
        out.append(
            FieldViolation("attributes", f"at most {validation.MAX_ATTRIBUTES_PER_USER} per user")
        )
    else:
        step = validation.MAX_ATTRIBUTES_PER_CALL
        for start in range(0, len(attributes), step):
            chunk = tuple(attributes[start : start + step])
            update = AttributesUpdate(record.user_id, chunk, AttributeSource.IMPORTED)
            out += [v for v in validation.check_attributes(update) if v.field != "user_id"]
    if record.signals:
        checked = validation.check_signals(record.user_id, record.signals, now)
        out += [v for v in checked if v.field != "user_id"]
        seen: set[str] = set()
        for i, signal in enumerate(record.signals):
            if signal.topic in seen:  # each replaces the topic's state: one per topic
                out.append(FieldViolation(f"signals[{i}].topic", "given twice"))
            seen.add(signal.topic)
    return out


# --- writing a line ------------------------------------------------------------------------


def _iso(seconds: float) -> str:
    when = _EPOCH + datetime.timedelta(microseconds=round(seconds * 1e6))
    return when.isoformat().replace("+00:00", "Z")


def to_line(profile: Profile) -> str:
    """A profile as one line of the format (every time included; lists in a stable order),
    without the newline."""
    data: dict[str, Any] = {"user_id": profile.user_id}
    if profile.attributes:
        data["attributes"] = {
            a.name: {"value": a.value, "source": a.source.name, "updated_at": _iso(a.updated_at)}
            for a in sorted(profile.attributes, key=lambda a: a.name)
        }
    if profile.topic_preferences:
        data["topic_preferences"] = [
            {"topic": t.topic, "stance": t.stance.name, "updated_at": _iso(t.updated_at)}
            for t in sorted(profile.topic_preferences, key=lambda t: t.topic)
            if t.stance is not None
        ]
    if profile.channel_preferences:
        data["channel_preferences"] = [
            {"channel": c.channel, "opted_in": c.opted_in, "updated_at": _iso(c.updated_at)}
            for c in sorted(profile.channel_preferences, key=lambda c: c.channel)
        ]
    if profile.max_messages_per_day:
        data["max_messages_per_day"] = profile.max_messages_per_day
    if profile.quiet_hours is not None:
        q = profile.quiet_hours
        data["quiet_hours"] = {
            "start_hour": q.start_hour,
            "end_hour": q.end_hour,
            "time_zone": q.time_zone,
        }
    if profile.consent.updated_at:  # given or withdrawn at some time (never asked: left out)
        data["consent"] = {
            "inferred_personalization": profile.consent.inferred_personalization,
            "updated_at": _iso(profile.consent.updated_at),
        }
    if profile.signals:
        data["signals"] = [
            {"topic": s.topic, "weight": s.weight, "observed_at": _iso(s.observed_at)}
            for s in sorted(profile.signals, key=lambda s: s.topic)
        ]
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


# --- the commands --------------------------------------------------------------------------


class Progress:
    """A one-line counter with its rate on a terminal, redrawn at most every 0.2 s; silent
    when off. ``clear`` before writing anything else to the same stream."""

    def __init__(self, stream: TextIO, *, enabled: bool, what: str) -> None:
        self.stream = stream
        self.enabled = enabled
        self.what = what
        self.started = time.monotonic()
        self._drawn = 0.0

    def update(self, done: int, *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._drawn < 0.2:
            return
        self._drawn = now
        rate = done / max(now - self.started, 1e-9)
        self.stream.write(f"\r\x1b[K{done:,} {self.what}  {rate:,.0f}/s")
        self.stream.flush()

    def clear(self) -> None:
        if self.enabled and self._drawn:
            self.stream.write("\r\x1b[K")
            self._drawn = 0.0


@dataclass
class ImportSummary:
    lines: int = 0  # non-blank lines read
    imported: int = 0
    bad: int = 0
    signals_not_kept: int = 0  # lines with signals for a user without consent
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.imported / self.seconds if self.seconds else 0.0


BadLine = Callable[[int, Sequence[FieldViolation]], None]


def report_to(stream: TextIO, progress: Progress | None = None) -> BadLine:
    """Writes each problem of a bad line as ``line N: <field>: <problem>``."""

    def report(number: int, violations: Sequence[FieldViolation]) -> None:
        if progress is not None:
            progress.clear()
        for v in violations:
            stream.write(
                f"line {number}: {v.field}: {v.description}\n"
                if v.field
                else f"line {number}: {v.description}\n"
            )

    return report


@contextlib.contextmanager
def _no_cycle_collection() -> Iterator[None]:
    """Python's cycle collector off for the import: what a line becomes (decoded JSON, frozen
    dataclasses, command tuples) holds no reference cycle and is freed by reference counting
    as its batch goes, so the collector would only walk each batch's young objects again and
    again (measured: 7% of the importer's CPU)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def import_lines(
    store: RedisStore,
    lines: Iterable[bytes | str],
    *,
    bad_line: BadLine,
    now: float | None = None,
    batch: int = DEFAULT_BATCH,
    progress: Progress | None = None,
) -> ImportSummary:
    """Read, check and write the lines, ``batch`` users per round trip, holding at most two
    batches: a file of any size streams through. One batch is written (by a thread that
    mostly waits for Redis, the GIL released) while the next is read and checked, so Redis
    and this process work at the same time. Bad lines go to ``bad_line`` as they are found
    (one refused by the store's attribute cap, when its batch is written), and the import
    goes on."""
    now = time.time() if now is None else now
    summary = ImportSummary()
    started = time.perf_counter()
    records: list[ProfileRecord] = []
    numbers: list[int] = []
    writing: tuple[Future[list[ProfileWrite]], list[int]] | None = None

    def finish() -> None:
        """Wait for the batch being written and count what the store did with it."""
        nonlocal writing
        if writing is None:
            return
        future, written = writing
        writing = None
        for number, result in zip(written, future.result(), strict=True):
            if result.erased:
                summary.bad += 1
                problem = "the profile was erased while the import ran: nothing of this line "
                bad_line(number, [FieldViolation("user_id", problem + "was written")])
                continue
            if result.over_bound is not None:
                summary.bad += 1
                field, bound = result.over_bound
                problem = f"a user holds at most {bound}; this would leave more"
                bad_line(
                    number, [FieldViolation(field, f"{problem} (nothing of this line was written)")]
                )
                continue
            if result.attributes_refused:
                summary.bad += 1
                problem = (
                    f"a user holds at most {validation.MAX_ATTRIBUTES_PER_USER}; this would "
                    f"leave {result.attributes_refused} (nothing of this line was written)"
                )
                bad_line(number, [FieldViolation("attributes", problem)])
                continue
            summary.imported += 1
            if result.signals_kept is False:
                summary.signals_not_kept += 1
        if progress is not None:
            progress.update(summary.lines)

    writer_pool = ThreadPoolExecutor(1, thread_name_prefix="import-writer")
    with _no_cycle_collection(), writer_pool as writer:

        def write() -> None:
            nonlocal writing, records, numbers
            finish()
            future = writer.submit(
                store.write_profiles,
                records,
                limit=validation.MAX_ATTRIBUTES_PER_USER,
                started=now,
            )
            writing = (future, numbers)
            records, numbers = [], []

        try:
            for number, raw in enumerate(lines, 1):
                if not raw.strip():
                    continue
                summary.lines += 1
                try:
                    records.append(parse_line(raw, now))
                except InvalidArgument as exc:
                    summary.bad += 1
                    bad_line(number, exc.violations)
                    continue
                numbers.append(number)
                if len(records) >= batch:
                    write()
            if records:
                write()
        finally:
            finish()  # raises the writer's error, if it had one
    summary.seconds = time.perf_counter() - started
    if progress is not None:
        progress.update(summary.lines, force=True)
        progress.clear()
    return summary


@dataclass
class ExportSummary:
    written: int = 0
    without_user_id: int = 0  # last written before user ids were kept: not exported


def export_profiles(
    store: RedisStore, out: TextIO, *, progress: Progress | None = None
) -> ExportSummary:
    summary = ExportSummary()
    for user_id, profile in store.scan_profiles():
        if user_id is None:
            summary.without_user_id += 1
            continue
        out.write(to_line(profile))
        out.write("\n")
        summary.written += 1
        if progress is not None:
            progress.update(summary.written)
    if progress is not None:
        progress.clear()
    return summary


def show_progress(quiet: bool, stream: TextIO = sys.stderr) -> bool:
    return not quiet and stream.isatty()
