"""The common line, checked at once.

Most lines are right, and the general path (``general``: a reader noting every problem with
its field path, then the API's rules run on the records built) costs most of the importer's
time. ``_fast_record`` checks a line's values in one pass by the same rules and builds its
record; at the first thing it does not accept (a problem, or a shape it does not handle) it
returns None and the line takes the general path, which reports what is wrong. So it may
only return a record the general path would return, equal to it (tests/test_import.py
compares the two on good and bad lines).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from tactful import validation
from tactful.domain import (
    Attribute,
    AttributeSource,
    ChannelPreference,
    Consent,
    PreferencesUpdate,
    ProfileRecord,
    QuietHours,
    Signal,
    TopicPreference,
)
from tactful.profile_line.shapes import (
    ATTRIBUTE,
    CHANNEL,
    CONSENT,
    FIELDS,
    QUIET,
    SIGNAL,
    SOURCES,
    STANCES,
    TOPIC,
    epoch_seconds,
)

_TIME_ZONES: frozenset[str] | None = None
_ISO_TIMES: dict[str, float] = {}  # text -> epoch seconds: a file repeats its times


class _Refused(Exception):
    """A line ``_fast_record`` leaves to the general path."""


def _fast_record(data: dict[str, Any], now: float) -> ProfileRecord | None:
    """The record of a line the general path accepts, checked by the same rules in one pass;
    None for anything else (see the module doc)."""
    try:
        return _fast_checked(data, now)
    except _Refused:
        return None


def _fast_time(value: Any, now: float) -> float:
    """``general._Reader.time``, for a value it accepts."""
    if value is None:
        return now
    if type(value) is str:
        seconds = _ISO_TIMES.get(value)
        if seconds is None:
            try:
                seconds = epoch_seconds(value)
            except ValueError:
                raise _Refused from None
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
    """``general._Reader.updated_at``, for a value it accepts."""
    if value is None:
        return now
    at = _fast_time(value, now)
    if not validation.MIN_TIMESTAMP <= at <= now + validation.FUTURE_SKEW_SECONDS:
        raise _Refused
    return at


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
    quiet = consent = None
    if "quiet_hours" in data:
        value = data["quiet_hours"]
        if type(value) is not dict or value.keys() != QUIET.allowed:
            raise _Refused
        start, end, zone = value["start_hour"], value["end_hour"], value["time_zone"]
        if type(start) is not int or type(end) is not int or type(zone) is not str:
            raise _Refused
        if _TIME_ZONES is None:
            _TIME_ZONES = validation._time_zones()
        if not (0 <= start <= 23 and 0 <= end <= 23 and zone in _TIME_ZONES):
            raise _Refused
        quiet = QuietHours(start, end, zone)
    if "consent" in data:
        value = data["consent"]
        if type(value) is not dict or not value.keys() <= CONSENT.allowed:
            raise _Refused
        given = value.get("inferred_personalization")
        if type(given) is not bool:
            raise _Refused
        consent = Consent(given, _fast_updated_at(value.get("updated_at"), now))
    topics: tuple[TopicPreference, ...] = ()
    if "topic_preferences" in data:
        topics = _fast_preferences(data["topic_preferences"], _TOPICS, now)
    channels: tuple[ChannelPreference, ...] = ()
    if "channel_preferences" in data:
        channels = _fast_preferences(data["channel_preferences"], _CHANNELS, now)
    signals: tuple[Signal, ...] = ()
    if "signals" in data:
        signals = _fast_signals(data["signals"], now)
    attributes: tuple[Attribute, ...] = ()
    if "attributes" in data:
        attributes = _fast_attributes(data["attributes"], now)
    preferences = PreferencesUpdate(user_id, topics, channels, max_per_day, quiet, consent)
    return ProfileRecord(user_id, preferences, attributes, signals)


class _PreferenceList(NamedTuple):
    """A list of preferences, each a name (``name``, matching ``name_ok``), a setting
    (``setting``: a ``setting_type`` among ``settings``, which maps it to what the record
    holds) and an optional ``updated_at``. The setting's type is checked before it is looked
    up because ``1 == True``: 1 is not a bool."""

    allowed: frozenset[str]
    name: str
    name_ok: Callable[[str], Any]
    setting: str
    setting_type: type
    settings: Mapping[Any, Any]
    make: Callable[[str, Any, float], Any]


_TOPICS = _PreferenceList(
    TOPIC.allowed, "topic", validation.TOPIC_RE.fullmatch, "stance", str, STANCES, TopicPreference
)
_CHANNELS = _PreferenceList(
    CHANNEL.allowed,
    "channel",
    validation.CHANNEL_RE.fullmatch,
    "opted_in",
    bool,
    {True: True, False: False},
    ChannelPreference,
)


def _fast_preferences(value: Any, kind: _PreferenceList, now: float) -> tuple[Any, ...]:
    """Topic or channel preferences: each name once, each setting one the API knows."""
    if type(value) is not list or len(value) > validation.MAX_PREFERENCES:
        raise _Refused
    allowed, name_field, name_ok, setting_field, setting_type, settings, make = kind
    seen: set[str] = set()
    built = []
    for item in value:
        if type(item) is not dict or not item.keys() <= allowed:
            raise _Refused
        name, setting = item.get(name_field), item.get(setting_field)
        if (
            type(name) is not str
            or type(setting) is not setting_type
            or setting not in settings
            or name in seen
            or not name_ok(name)
        ):
            raise _Refused
        seen.add(name)
        at = _fast_updated_at(item.get("updated_at"), now)
        built.append(make(name, settings[setting], at))
    return tuple(built)


def _fast_signals(value: Any, now: float) -> tuple[Signal, ...]:
    if type(value) is not list or len(value) > validation.MAX_SIGNALS:
        raise _Refused
    allowed = SIGNAL.allowed
    seen: set[str] = set()
    built = []
    latest = now + validation.FUTURE_SKEW_SECONDS
    for item in value:
        if type(item) is not dict or not item.keys() <= allowed:
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
        built.append(Signal(topic, weight, observed))
    return tuple(built)


def _fast_attributes(value: Any, now: float) -> tuple[Attribute, ...]:
    if type(value) is not dict or len(value) > validation.MAX_ATTRIBUTES_PER_USER:
        raise _Refused
    allowed = ATTRIBUTE.allowed
    built = []
    name_ok, control = validation.ATTRIBUTE_NAME_RE.fullmatch, validation.CONTROL_CHAR_RE
    for name, spec in value.items():
        if type(spec) is str:
            text, source, at = spec, AttributeSource.IMPORTED, now
        elif type(spec) is dict and spec.keys() <= allowed:
            given, source_name = spec.get("value"), spec.get("source", "IMPORTED")
            if type(given) is not str or type(source_name) is not str:
                raise _Refused
            if source_name not in SOURCES:
                raise _Refused
            text, source = given, SOURCES[source_name]
            at = _fast_updated_at(spec.get("updated_at"), now)
        else:
            raise _Refused
        if (
            len(text) > validation.MAX_ATTRIBUTE_VALUE_CHARS
            or not name_ok(name)
            or control.search(text)
        ):
            raise _Refused
        built.append(Attribute(name, text, source, at))
    return tuple(built)
