"""The domain: plain frozen dataclasses and enums. Nothing here knows gRPC or Redis.

Enum values mirror the numbers in ``proto/tactful/v1`` (a test keeps them equal), so the
transport converts with ``Enum(number)`` and an unknown number becomes ``None``, which
validation reports.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Stance(enum.IntEnum):
    LIKE = 1
    DISLIKE = 2
    NEUTRAL = 3  # clears an earlier LIKE or DISLIKE; never stored


class AttributeSource(enum.IntEnum):
    STATED = 1  # the customer said it: outranks IMPORTED
    IMPORTED = 2  # a system of record holds it: never replaces a STATED value


class ReasonCode(enum.IntEnum):
    EXPLICIT_LIKE = 1
    INFERRED_INTEREST = 2
    BUSINESS_PRIORITY = 3
    EXPLORATION = 4
    CONTROL_GROUP = 5
    FALLBACK = 6
    SEGMENT = 7


class HoldReason(enum.IntEnum):
    NONE = 0
    NO_ELIGIBLE_OFFER = 1
    CHANNEL_OPTED_OUT = 2
    FATIGUE_CAP = 3
    QUIET_HOURS = 4
    STORE_UNAVAILABLE = 5


class Arm(enum.IntEnum):
    PERSONALIZED = 1
    CONTROL = 2
    FALLBACK = 3


class OutcomeEvent(enum.IntEnum):
    IMPRESSION_IGNORED = 1
    CLICK = 2
    CONVERSION = 3
    DISMISS = 4


# --- catalog -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Offer:
    offer_id: str
    title: str
    topics: tuple[str, ...]
    channels: tuple[str, ...]
    priority: float = 0.0
    sensitive: bool = False
    start_time: float | None = None  # epoch seconds; None = open
    end_time: float | None = None
    max_per_user_per_day: int = 0  # 0 = no cap of its own
    segments: tuple[str, ...] = ()  # eligible only in one of them (when any)
    excluded_segments: tuple[str, ...] = ()  # never in any of them

    def is_active(self, now: float) -> bool:
        if self.start_time is not None and now < self.start_time:
            return False
        return self.end_time is None or now < self.end_time


@dataclass(frozen=True, slots=True)
class Segment:
    """A group of users defined by a rule (``tactful.segments``); ``rule`` is kept in
    canonical form once accepted."""

    segment_id: str
    rule: str
    sensitive: bool = False
    description: str = ""


# --- profiles ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TopicPreference:
    topic: str
    stance: Stance | None  # None: an enum number this version does not know (invalid)
    updated_at: float = 0.0


@dataclass(frozen=True, slots=True)
class ChannelPreference:
    channel: str
    opted_in: bool
    updated_at: float = 0.0


@dataclass(frozen=True, slots=True)
class QuietHours:
    start_hour: int
    end_hour: int
    time_zone: str


@dataclass(frozen=True, slots=True)
class Consent:
    inferred_personalization: bool = False  # no consent unless the customer gave it
    updated_at: float = 0.0


@dataclass(frozen=True, slots=True)
class Signal:
    topic: str
    weight: float
    observed_at: float  # epoch seconds


def decay(signal: Signal, now: float, half_life_seconds: float) -> float:
    """A signal's weight at ``now``: halved every ``half_life_seconds`` since it was seen."""
    age = max(0.0, now - signal.observed_at)
    return float(signal.weight * 0.5 ** (age / half_life_seconds))


@dataclass(frozen=True, slots=True)
class ObservedSignal:
    """A signal as RecordSignals receives it: ``observed_at`` None means "just now"."""

    topic: str
    weight: float
    observed_at: float | None = None


@dataclass(frozen=True, slots=True)
class ContactCounter:
    channel: str
    offer_id: str  # "" = all offers on the channel
    count: int
    window_start: float


@dataclass(frozen=True, slots=True)
class Cooldown:
    """Something the user dismissed: an offer, or (if so configured) a topic."""

    offer_id: str  # "" when a topic cools down
    topic: str  # "" when an offer cools down
    until: float


@dataclass(frozen=True, slots=True)
class Attribute:
    """A fact about the user (country, language, a persona they picked) and who said it."""

    name: str
    value: str
    source: AttributeSource
    updated_at: float = 0.0  # epoch seconds, set by the server


@dataclass(frozen=True, slots=True)
class Profile:
    user_id: str
    topic_preferences: tuple[TopicPreference, ...] = ()
    channel_preferences: tuple[ChannelPreference, ...] = ()
    max_messages_per_day: int = 0
    quiet_hours: QuietHours | None = None
    consent: Consent = field(default_factory=Consent)
    signals: tuple[Signal, ...] = ()  # as stored: weight at observed_at, not decayed
    contact_counters: tuple[ContactCounter, ...] = ()
    last_contacts: tuple[tuple[str, float], ...] = ()  # (channel, when) for minimum gaps
    cooldowns: tuple[Cooldown, ...] = ()
    attributes: tuple[Attribute, ...] = ()

    def topics_with(self, stance: Stance) -> frozenset[str]:
        return frozenset(p.topic for p in self.topic_preferences if p.stance is stance)

    def opted_out_channels(self) -> frozenset[str]:
        return frozenset(c.channel for c in self.channel_preferences if not c.opted_in)


@dataclass(frozen=True, slots=True)
class PreferencesUpdate:
    """What SetPreferences was given; absent parts (None / empty) are left as they are."""

    user_id: str
    topic_preferences: tuple[TopicPreference, ...] = ()
    channel_preferences: tuple[ChannelPreference, ...] = ()
    max_messages_per_day: int | None = None
    quiet_hours: QuietHours | None = None
    consent: Consent | None = None


@dataclass(frozen=True, slots=True)
class AttributesUpdate:
    """What SetAttributes was given: values to merge, all from one source; an empty value
    removes the attribute."""

    user_id: str
    attributes: tuple[tuple[str, str], ...] = ()  # (name, value)
    source: AttributeSource | None = None  # None: UNSPECIFIED or unknown (invalid)


@dataclass(frozen=True, slots=True)
class ProfileRecord:
    """One user's profile as a bulk import writes it and an export reads it: what the customer
    and systems of record said, and the inferred signals, each with its time (contact
    counters, cooldowns and decisions are operational state, not carried)."""

    user_id: str
    preferences: PreferencesUpdate  # its stances, opt-ins and consent carry their updated_at
    attributes: tuple[Attribute, ...] = ()
    signals: tuple[Signal, ...] = ()  # weight at observed_at: the state, not an observation


# --- decisions -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DecideRequest:
    user_id: str
    channel: str
    placement: str = ""
    numeric_context: tuple[tuple[str, float], ...] = ()
    categorical_context: tuple[tuple[str, str], ...] = ()
    candidate_offer_ids: tuple[str, ...] = ()
    slots: int = 0  # 0 means 1
    dry_run: bool = False
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class Reason:
    code: ReasonCode
    detail: str


@dataclass(frozen=True, slots=True)
class Choice:
    offer_id: str
    score: float
    propensity: float
    reasons: tuple[Reason, ...]


@dataclass(frozen=True, slots=True)
class Decision:
    decision_id: str
    choices: tuple[Choice, ...]
    hold_reason: HoldReason
    model_version: str
    arm: Arm
    next_eligible_time: float | None = None  # with a FATIGUE_CAP or QUIET_HOURS hold


@dataclass(frozen=True, slots=True)
class OutcomeReport:
    decision_id: str
    offer_id: str
    event: OutcomeEvent | None  # None: unknown enum number (invalid)
    outcome_id: str
    value: float | None = None

    def reward(self) -> float:
        """CLICK and CONVERSION earn 1 (or ``value``); an ignored impression or a dismiss, 0."""
        if self.event in (OutcomeEvent.CLICK, OutcomeEvent.CONVERSION):
            return 1.0 if self.value is None else self.value
        return 0.0
