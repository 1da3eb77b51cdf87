"""Protobuf messages <-> domain dataclasses. The only module that knows both sides."""

from __future__ import annotations

import enum
from typing import Any, TypeVar

from google.protobuf.timestamp_pb2 import Timestamp

from tactful import domain
from tactful.v1 import catalog_pb2, decisioning_pb2, profiles_pb2

E = TypeVar("E", bound=enum.IntEnum)


def _enum(cls: type[E], number: int) -> E | None:
    """A known, non-zero enum value, or None (which validation reports)."""
    try:
        return cls(number)
    except ValueError:
        return None


def _wire(value: enum.IntEnum | None) -> Any:
    """A domain enum as the protobuf enum number (0, UNSPECIFIED, for None)."""
    return 0 if value is None else int(value)


def _seconds(ts: Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.seconds, ts.nanos = divmod(round(seconds * 1e9), 1_000_000_000)
    return ts


# --- Decisioning ---------------------------------------------------------------------------


def decide_request(msg: decisioning_pb2.DecideRequest) -> domain.DecideRequest:
    return domain.DecideRequest(
        user_id=msg.user_id,
        channel=msg.channel,
        placement=msg.placement,
        numeric_context=tuple(msg.numeric_context.items()),
        categorical_context=tuple(msg.categorical_context.items()),
        candidate_offer_ids=tuple(msg.candidate_offer_ids),
        slots=msg.slots,
        dry_run=msg.dry_run,
        request_id=msg.request_id,
    )


def decide_response(decision: domain.Decision) -> decisioning_pb2.DecideResponse:
    # Filled in place with add(): about half the cost of building every Choice and Reason
    # as a message of its own and copying them into the response.
    msg = decisioning_pb2.DecideResponse(
        decision_id=decision.decision_id,
        hold_reason=_wire(decision.hold_reason),
        model_version=decision.model_version,
        arm=_wire(decision.arm),
    )
    for c in decision.choices:
        choice = msg.choices.add(offer_id=c.offer_id, score=c.score, propensity=c.propensity)
        for r in c.reasons:
            choice.reasons.add(code=_wire(r.code), detail=r.detail)
    if decision.next_eligible_time is not None:
        msg.next_eligible_time.CopyFrom(_timestamp(decision.next_eligible_time))
    return msg


def outcome_report(msg: decisioning_pb2.ReportOutcomeRequest) -> domain.OutcomeReport:
    return domain.OutcomeReport(
        decision_id=msg.decision_id,
        offer_id=msg.offer_id,
        event=_enum(domain.OutcomeEvent, msg.event),
        outcome_id=msg.outcome_id,
        value=msg.value if msg.HasField("value") else None,
    )


# --- Profiles ------------------------------------------------------------------------------


def preferences_update(msg: profiles_pb2.SetPreferencesRequest) -> domain.PreferencesUpdate:
    return domain.PreferencesUpdate(
        user_id=msg.user_id,
        topic_preferences=tuple(
            domain.TopicPreference(p.topic, _enum(domain.Stance, p.stance))
            for p in msg.topic_preferences
        ),
        channel_preferences=tuple(
            domain.ChannelPreference(c.channel, c.opted_in) for c in msg.channel_preferences
        ),
        max_messages_per_day=(
            msg.max_messages_per_day if msg.HasField("max_messages_per_day") else None
        ),
        quiet_hours=(
            domain.QuietHours(
                msg.quiet_hours.start_hour, msg.quiet_hours.end_hour, msg.quiet_hours.time_zone
            )
            if msg.HasField("quiet_hours")
            else None
        ),
        consent=(
            domain.Consent(msg.consent.inferred_personalization)
            if msg.HasField("consent")
            else None
        ),
    )


def attributes_update(msg: profiles_pb2.SetAttributesRequest) -> domain.AttributesUpdate:
    return domain.AttributesUpdate(
        user_id=msg.user_id,
        attributes=tuple(msg.attributes.items()),
        source=_enum(domain.AttributeSource, msg.source),
    )


def signals(msgs: list[profiles_pb2.Signal]) -> list[domain.ObservedSignal]:
    return [
        domain.ObservedSignal(
            s.topic, s.weight, _seconds(s.observed_at) if s.HasField("observed_at") else None
        )
        for s in msgs
    ]


def profile(p: domain.Profile) -> profiles_pb2.Profile:
    msg = profiles_pb2.Profile(
        user_id=p.user_id,
        topic_preferences=[
            profiles_pb2.TopicPreference(
                topic=t.topic, stance=_wire(t.stance), updated_at=_timestamp(t.updated_at)
            )
            for t in p.topic_preferences
        ],
        channel_preferences=[
            profiles_pb2.ChannelPreference(
                channel=c.channel, opted_in=c.opted_in, updated_at=_timestamp(c.updated_at)
            )
            for c in p.channel_preferences
        ],
        max_messages_per_day=p.max_messages_per_day,
        consent=profiles_pb2.Consent(
            inferred_personalization=p.consent.inferred_personalization,
            updated_at=_timestamp(p.consent.updated_at) if p.consent.updated_at else None,
        ),
        signals=[
            profiles_pb2.Signal(
                topic=s.topic, weight=s.weight, observed_at=_timestamp(s.observed_at)
            )
            for s in p.signals
        ],
        contact_counters=[
            profiles_pb2.ContactCounter(
                channel=c.channel,
                offer_id=c.offer_id,
                count=c.count,
                window_start=_timestamp(c.window_start),
            )
            for c in p.contact_counters
        ],
        cooldowns=[
            profiles_pb2.Cooldown(offer_id=c.offer_id, topic=c.topic, until=_timestamp(c.until))
            for c in p.cooldowns
        ],
        attributes=[
            profiles_pb2.Attribute(
                name=a.name,
                value=a.value,
                source=_wire(a.source),
                updated_at=_timestamp(a.updated_at),
            )
            for a in p.attributes
        ],
    )
    if p.quiet_hours is not None:
        msg.quiet_hours.CopyFrom(
            profiles_pb2.QuietHours(
                start_hour=p.quiet_hours.start_hour,
                end_hour=p.quiet_hours.end_hour,
                time_zone=p.quiet_hours.time_zone,
            )
        )
    return msg


# --- Catalog -------------------------------------------------------------------------------


def offer_from_proto(msg: catalog_pb2.Offer) -> domain.Offer:
    return domain.Offer(
        offer_id=msg.offer_id,
        title=msg.title,
        topics=tuple(msg.topics),
        channels=tuple(msg.channels),
        priority=msg.priority,
        sensitive=msg.sensitive,
        start_time=_seconds(msg.start_time) if msg.HasField("start_time") else None,
        end_time=_seconds(msg.end_time) if msg.HasField("end_time") else None,
        max_per_user_per_day=msg.max_per_user_per_day,
        segments=tuple(msg.segments),
        excluded_segments=tuple(msg.excluded_segments),
    )


def offer_to_proto(offer: domain.Offer) -> catalog_pb2.Offer:
    msg = catalog_pb2.Offer(
        offer_id=offer.offer_id,
        title=offer.title,
        topics=offer.topics,
        channels=offer.channels,
        priority=offer.priority,
        sensitive=offer.sensitive,
        max_per_user_per_day=offer.max_per_user_per_day,
        segments=offer.segments,
        excluded_segments=offer.excluded_segments,
    )
    if offer.start_time is not None:
        msg.start_time.CopyFrom(_timestamp(offer.start_time))
    if offer.end_time is not None:
        msg.end_time.CopyFrom(_timestamp(offer.end_time))
    return msg


def segment_from_proto(msg: catalog_pb2.Segment) -> domain.Segment:
    return domain.Segment(
        segment_id=msg.segment_id,
        rule=msg.rule,
        sensitive=msg.sensitive,
        description=msg.description,
    )


def segment_to_proto(segment: domain.Segment) -> catalog_pb2.Segment:
    return catalog_pb2.Segment(
        segment_id=segment.segment_id,
        rule=segment.rule,
        sensitive=segment.sensitive,
        description=segment.description,
    )
