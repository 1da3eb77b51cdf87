"""What a profile line may hold: its fields, the fields of each object in it, the names of
stances and sources, and how a time is read."""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from tactful.domain import AttributeSource, Stance

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
class Shape:
    """The fields an object of a line must have, and those it may have."""

    required: tuple[str, ...]
    allowed: frozenset[str]


def _shape(required: tuple[str, ...], optional: tuple[str, ...] = ()) -> Shape:
    return Shape(required, frozenset(required + optional))


TOPIC = _shape(("topic", "stance"), ("updated_at",))
CHANNEL = _shape(("channel", "opted_in"), ("updated_at",))
SIGNAL = _shape(("topic", "weight"), ("observed_at",))
QUIET = _shape(("start_hour", "end_hour", "time_zone"))
CONSENT = _shape(("inferred_personalization",), ("updated_at",))
ATTRIBUTE = _shape(("value",), ("source", "updated_at"))
STANCES = {"LIKE": Stance.LIKE, "DISLIKE": Stance.DISLIKE, "NEUTRAL": Stance.NEUTRAL}
SOURCES = {"STATED": AttributeSource.STATED, "IMPORTED": AttributeSource.IMPORTED}
EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_MICROSECOND = datetime.timedelta(microseconds=1)


def epoch_seconds(text: str) -> float:
    """An ISO 8601 time (UTC unless it says otherwise) as epoch seconds, exact to the
    microsecond, as the store keeps times; ValueError if it is not one."""
    when = datetime.datetime.fromisoformat(text)
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return ((when - EPOCH) // _MICROSECOND) / 1e6
