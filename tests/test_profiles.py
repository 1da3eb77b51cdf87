"""Profiles: merge semantics, signal decay, the export and erasure, on a real redis-server and on
a Redis Cluster."""

from __future__ import annotations

import time

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from tactful import keys
from tactful.v1 import catalog_pb2
from tactful.v1 import decisioning_pb2 as d
from tactful.v1 import profiles_pb2 as p

from conftest import offer

pytestmark = pytest.mark.both_stores


def get(profiles, user="alice") -> p.Profile:
    return profiles.GetProfile(p.GetProfileRequest(user_id=user))


def test_set_preferences_merges_and_timestamps(profiles):
    before = time.time()
    profiles.SetPreferences(
        p.SetPreferencesRequest(
            user_id="alice",
            topic_preferences=[p.TopicPreference(topic="running", stance=p.STANCE_LIKE)],
        )
    )
    merged = profiles.SetPreferences(
        p.SetPreferencesRequest(
            user_id="alice",
            topic_preferences=[p.TopicPreference(topic="golf", stance=p.STANCE_DISLIKE)],
            channel_preferences=[p.ChannelPreference(channel="sms", opted_in=False)],
            max_messages_per_day=3,
            quiet_hours=p.QuietHours(start_hour=22, end_hour=7, time_zone="Europe/Paris"),
            consent=p.Consent(inferred_personalization=True),
        )
    )
    assert merged == get(profiles)
    assert {(t.topic, t.stance) for t in merged.topic_preferences} == {
        ("running", p.STANCE_LIKE),
        ("golf", p.STANCE_DISLIKE),
    }
    assert all(t.updated_at.seconds >= int(before) for t in merged.topic_preferences)
    assert [(c.channel, c.opted_in) for c in merged.channel_preferences] == [("sms", False)]
    assert merged.max_messages_per_day == 3
    assert merged.quiet_hours == p.QuietHours(start_hour=22, end_hour=7, time_zone="Europe/Paris")
    assert merged.consent.inferred_personalization is True
    assert merged.consent.updated_at.seconds >= int(before)
    # Fields left out are left as they are; max_messages_per_day=0 clears the customer's limit.
    again = profiles.SetPreferences(
        p.SetPreferencesRequest(user_id="alice", max_messages_per_day=0)
    )
    assert again.max_messages_per_day == 0
    assert again.consent.inferred_personalization is True
    assert len(again.topic_preferences) == 2


def test_unknown_user_has_an_empty_profile(profiles):
    profile = get(profiles, "nobody")
    assert profile.user_id == "nobody"
    assert not profile.topic_preferences and not profile.signals
    assert profile.consent.inferred_personalization is False


def test_signals_decay_with_the_half_life(profiles, settings):
    profiles.SetPreferences(
        p.SetPreferencesRequest(user_id="alice", consent=p.Consent(inferred_personalization=True))
    )
    half_life = settings.policy.signal_half_life_hours * 3600
    observed = Timestamp(seconds=int(time.time() - half_life))
    profiles.RecordSignals(
        p.RecordSignalsRequest(
            user_id="alice", signals=[p.Signal(topic="yoga", weight=8.0, observed_at=observed)]
        )
    )
    (signal,) = get(profiles).signals
    assert signal.topic == "yoga"
    assert signal.weight == pytest.approx(4.0, rel=1e-3)
    # A new observation adds to what is left of the old one.
    profiles.RecordSignals(
        p.RecordSignalsRequest(user_id="alice", signals=[p.Signal(topic="yoga", weight=1.0)])
    )
    (signal,) = get(profiles).signals
    assert signal.weight == pytest.approx(5.0, rel=1e-3)
    assert signal.observed_at.seconds >= int(time.time()) - 5


def test_delete_profile_leaves_no_key_of_the_user(store, profiles, catalog, decisioning):
    catalog.PutOffer(catalog_pb2.PutOfferRequest(offer=offer("a")))
    profiles.SetPreferences(
        p.SetPreferencesRequest(
            user_id="alice",
            topic_preferences=[p.TopicPreference(topic="general", stance=p.STANCE_LIKE)],
            consent=p.Consent(inferred_personalization=True),
        )
    )
    profiles.RecordSignals(
        p.RecordSignalsRequest(user_id="alice", signals=[p.Signal(topic="yoga", weight=1.0)])
    )
    shown = decisioning.Decide(d.DecideRequest(user_id="alice", channel="web", request_id="r1"))
    decisioning.ReportOutcome(
        d.ReportOutcomeRequest(
            decision_id=shown.decision_id,
            offer_id=shown.choices[0].offer_id,
            event=d.OUTCOME_EVENT_CLICK,
            outcome_id="o1",
        )
    )
    profiles.SetPreferences(p.SetPreferencesRequest(user_id="bob", max_messages_per_day=2))
    digest = keys.user_digest("alice")
    assert len(list(store.client.scan_iter(match=f"*{digest}*"))) == 5
    decision_keys = keys.DecisionKeys.of(shown.decision_id)
    assert store.client.exists(decision_keys.record, decision_keys.outcomes) == 2
    assert store.client.zscore(keys.AWAITING, shown.decision_id) is not None
    assert store.client.hexists(keys.LEARNED, shown.decision_id)  # the click went to learning

    profiles.DeleteProfile(p.DeleteProfileRequest(user_id="alice"))

    assert list(store.client.scan_iter(match=f"*{digest}*")) == []
    # Its decisions and their outcomes go too: they hold a pseudonym and the context.
    assert store.client.exists(decision_keys.record, decision_keys.outcomes) == 0
    assert store.client.zscore(keys.AWAITING, shown.decision_id) is None  # its reward window
    assert not store.client.hexists(keys.LEARNED, shown.decision_id)
    assert list(store.client.scan_iter(match="*alice*")) == []
    assert get(profiles) == p.Profile(user_id="alice", consent=p.Consent())
    assert get(profiles, "bob").max_messages_per_day == 2  # nobody else is touched
    profiles.DeleteProfile(p.DeleteProfileRequest(user_id="alice"))  # idempotent
