"""Per-user bounds: one user cannot be grown without limit (every Decide for them reads the
whole profile, and a huge one would stall Redis for everyone). Past a bound a call changes
nothing and is refused with INVALID_ARGUMENT naming the bound; below it, and for what the
user already holds, everything works as before. Real server, real redis-server."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tactful import validation
from tactful.v1 import profiles_pb2 as p

TOPICS = validation.MAX_TOPIC_PREFERENCES_PER_USER
CHANNELS = validation.MAX_CHANNEL_PREFERENCES_PER_USER
SIGNALS = validation.MAX_SIGNAL_TOPICS_PER_USER
PER_CALL = 250


def violations(error: grpc.RpcError) -> list[tuple[str, str]]:
    status = rpc_status.from_call(error)
    assert status is not None
    details = error_details_pb2.BadRequest()
    status.details[0].Unpack(details)
    return [(v.field, v.description) for v in details.field_violations]


def stances(user: str, topics: list[str], stance: int = p.STANCE_LIKE) -> p.SetPreferencesRequest:
    return p.SetPreferencesRequest(
        user_id=user,
        topic_preferences=[p.TopicPreference(topic=t, stance=stance) for t in topics],
    )


def test_topic_stances_stop_at_the_bound_and_a_refused_call_changes_nothing(profiles):
    for start in range(0, TOPICS, PER_CALL):
        profiles.SetPreferences(stances("many", [f"t{i}" for i in range(start, start + PER_CALL)]))
    with pytest.raises(grpc.RpcError) as refused:
        profiles.SetPreferences(stances("many", ["t0", "one-more"], p.STANCE_DISLIKE))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    [(field, description)] = violations(refused.value)
    assert field == "topic_preferences"
    assert f"at most {TOPICS}" in description
    profile = profiles.GetProfile(p.GetProfileRequest(user_id="many"))
    assert len(profile.topic_preferences) == TOPICS
    assert {t.stance for t in profile.topic_preferences} == {p.STANCE_LIKE}  # t0 unchanged
    # What the user holds can still change, and a NEUTRAL makes room for a new topic.
    profiles.SetPreferences(stances("many", ["t0"], p.STANCE_DISLIKE))
    after = profiles.SetPreferences(
        p.SetPreferencesRequest(
            user_id="many",
            topic_preferences=[
                p.TopicPreference(topic="t1", stance=p.STANCE_NEUTRAL),
                p.TopicPreference(topic="one-more", stance=p.STANCE_LIKE),
            ],
        )
    )
    topics = {t.topic: t.stance for t in after.topic_preferences}
    assert len(topics) == TOPICS
    assert topics["t0"] == p.STANCE_DISLIKE and topics["one-more"] == p.STANCE_LIKE
    assert "t1" not in topics


def test_channel_choices_stop_at_the_bound(profiles):
    for start in range(0, CHANNELS, PER_CALL):
        profiles.SetPreferences(
            p.SetPreferencesRequest(
                user_id="chan",
                channel_preferences=[
                    p.ChannelPreference(channel=f"c{i}", opted_in=True)
                    for i in range(start, min(start + PER_CALL, CHANNELS))
                ],
            )
        )
    with pytest.raises(grpc.RpcError) as refused:
        profiles.SetPreferences(
            p.SetPreferencesRequest(
                user_id="chan",
                channel_preferences=[p.ChannelPreference(channel="email", opted_in=False)],
            )
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    [(field, description)] = violations(refused.value)
    assert field == "channel_preferences" and f"at most {CHANNELS}" in description
    profile = profiles.GetProfile(p.GetProfileRequest(user_id="chan"))
    assert len(profile.channel_preferences) == CHANNELS


def test_signal_topics_stop_at_the_bound(profiles):
    profiles.SetPreferences(
        p.SetPreferencesRequest(user_id="busy", consent=p.Consent(inferred_personalization=True))
    )
    for start in range(0, SIGNALS, PER_CALL):
        assert profiles.RecordSignals(
            p.RecordSignalsRequest(
                user_id="busy",
                signals=[
                    p.Signal(topic=f"s{i}", weight=1.0) for i in range(start, start + PER_CALL)
                ],
            )
        ).stored
    with pytest.raises(grpc.RpcError) as refused:
        profiles.RecordSignals(
            p.RecordSignalsRequest(
                user_id="busy",
                signals=[p.Signal(topic="s0", weight=1.0), p.Signal(topic="new", weight=1.0)],
            )
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    [(field, description)] = violations(refused.value)
    assert field == "signals" and f"at most {SIGNALS}" in description
    profile = profiles.GetProfile(p.GetProfileRequest(user_id="busy"))
    assert len(profile.signals) == SIGNALS
    assert round(next(s.weight for s in profile.signals if s.topic == "s0")) == 1  # unchanged
    # A topic the user already has signals of still takes new observations.
    assert profiles.RecordSignals(
        p.RecordSignalsRequest(user_id="busy", signals=[p.Signal(topic="s0", weight=1.0)])
    ).stored
