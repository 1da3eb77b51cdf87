"""The general path: a decoded line read into records, every problem noted with its field
path (``signals[0].weight``), then the API's own rules run on the records built."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from tactful import validation
from tactful.domain import (
    Attribute,
    AttributeSource,
    AttributesUpdate,
    ChannelPreference,
    Consent,
    PreferencesUpdate,
    ProfileRecord,
    QuietHours,
    Signal,
    TopicPreference,
)
from tactful.errors import FieldViolation
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
    Shape,
    epoch_seconds,
)

Violations = validation.Violations


def _general_record(data: dict[str, Any], now: float) -> ProfileRecord:
    """A decoded line as a record by the general path, or ``InvalidArgument`` with every
    problem found."""
    reader = _Reader(now)
    record = reader.record(data)
    validation.require(reader.out)
    validation.require(_check(record, now))
    return record


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
            topics = self.items(data["topic_preferences"], "topic_preferences", TOPIC, self.topic)
        if "channel_preferences" in data:
            channels = self.items(
                data["channel_preferences"], "channel_preferences", CHANNEL, self.channel
            )
        if "signals" in data:
            signals = self.items(data["signals"], "signals", SIGNAL, self.signal)
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
                return epoch_seconds(value)
            except ValueError:
                self.bad(field, name, f"{value[:40]!r} is not an ISO 8601 time")
                return self.now
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

    def fields(self, value: Any, field: str, shape: Shape) -> dict[str, Any] | None:
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
        self, value: Any, name: str, shape: Shape, build: Callable[[dict[str, Any], str], Any]
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
            STANCES.get(stance) if type(stance) is str else None,  # None: reported
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
        fields = self.fields(value, "quiet_hours", QUIET)
        if fields is None:
            return None
        return QuietHours(
            self.integer(fields["start_hour"], "quiet_hours", "start_hour"),
            self.integer(fields["end_hour"], "quiet_hours", "end_hour"),
            self.string(fields["time_zone"], "quiet_hours", "time_zone"),
        )

    def consent(self, value: Any) -> Consent | None:
        fields = self.fields(value, "consent", CONSENT)
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
            fields = self.fields(spec, field, ATTRIBUTE)
            if fields is None:
                continue
            source = fields.get("source", "IMPORTED")
            if source not in SOURCES:
                self.bad(field, "source", "must be STATED or IMPORTED")
            out.append(
                Attribute(
                    name,
                    self.string(fields["value"], field, "value"),
                    SOURCES.get(source, AttributeSource.IMPORTED),
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
