"""Profiles: merge semantics, signal decay, attributes, the export and erasure, on a real
redis-server and on a Redis Cluster."""

from __future__ import annotations

import time

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from tactful import keys, validation
from tactful.domain import AttributeSource
from tactful.v1 import catalog_pb2
from tactful.v1 import decisioning_pb2 as d
from tactful.v1 import profiles_pb2 as p

from conftest import offer

pytestmark = pytest.mark.both_stores


STATED, IMPORTED = p.ATTRIBUTE_SOURCE_STATED, p.ATTRIBUTE_SOURCE_IMPORTED


def get(profiles, user="alice") -> p.Profile:
    return profiles.GetProfile(p.GetProfileRequest(user_id=user))


def set_attributes(profiles, source, user="alice", **attributes: str) -> p.Profile:
    return profiles.SetAttributes(
        p.SetAttributesRequest(user_id=user, attributes=attributes, source=source)
    )


def attrs(profile: p.Profile) -> dict[str, tuple[str, int]]:
    """name -> (value, source), as the profile lists them."""
    return {a.name: (a.value, a.source) for a in profile.attributes}


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


def test_set_attributes_merges_with_source_and_server_time(profiles):
    before = time.time()
    first = set_attributes(profiles, STATED, country="fr", language="fr-FR")
    assert attrs(first) == {"country": ("fr", STATED), "language": ("fr-FR", STATED)}
    # A later call merges: what it leaves out is left as it is.
    merged = set_attributes(profiles, IMPORTED, persona="runner|casual", tier="gold")
    after = time.time()
    assert merged == get(profiles)
    assert [a.name for a in merged.attributes] == ["country", "language", "persona", "tier"]
    assert attrs(merged)["persona"] == ("runner|casual", IMPORTED)  # '|' is a value like any
    assert attrs(merged)["tier"] == ("gold", IMPORTED)
    for attribute in merged.attributes:
        # Stamped by the server: the request carries no time at all.
        assert before - 1e-3 <= attribute.updated_at.ToNanoseconds() / 1e9 <= after + 1e-3
    # Attributes sit beside the preferences, and each call returns the whole profile.
    with_prefs = profiles.SetPreferences(
        p.SetPreferencesRequest(user_id="alice", max_messages_per_day=2)
    )
    assert with_prefs.attributes == merged.attributes
    assert set_attributes(profiles, STATED).max_messages_per_day == 2  # an empty call: a read


def test_a_restated_attribute_gets_a_new_value_and_time(profiles):
    (old,) = set_attributes(profiles, STATED, country="fr").attributes
    time.sleep(0.01)
    (new,) = set_attributes(profiles, STATED, country="de").attributes
    assert (new.value, new.source) == ("de", STATED)
    assert new.updated_at.ToNanoseconds() > old.updated_at.ToNanoseconds()


def test_an_empty_value_removes_the_attribute(profiles):
    set_attributes(profiles, STATED, country="fr", language="fr-FR")
    left = set_attributes(profiles, STATED, country="", never_set="")
    assert attrs(left) == {"language": ("fr-FR", STATED)}
    assert attrs(set_attributes(profiles, STATED, language="")) == {}
    assert get(profiles) == p.Profile(user_id="alice", consent=p.Consent())


def test_stated_outranks_imported(profiles):
    """What the customer said outranks a system of record: an import neither replaces nor
    removes a STATED value; the customer's word replaces an imported one."""
    (stated,) = set_attributes(profiles, STATED, country="fr").attributes
    imported = set_attributes(profiles, IMPORTED, country="de", language="de-DE")
    assert attrs(imported) == {"country": ("fr", STATED), "language": ("de-DE", IMPORTED)}
    assert imported.attributes[0] == stated  # untouched, time included
    assert attrs(set_attributes(profiles, IMPORTED, country="")) == attrs(imported)
    # An import replaces (or removes) what an earlier import said.
    assert attrs(set_attributes(profiles, IMPORTED, language="en-GB"))["language"] == (
        "en-GB",
        IMPORTED,
    )
    # The customer replaces an imported value, and it is theirs from then on.
    restated = set_attributes(profiles, STATED, language="fr-FR")
    assert attrs(restated)["language"] == ("fr-FR", STATED)
    assert attrs(set_attributes(profiles, IMPORTED, language="en-GB"))["language"] == (
        "fr-FR",
        STATED,
    )
    # Only the customer removes what they said.
    assert attrs(set_attributes(profiles, STATED, country="", language="")) == {}


def test_a_user_holds_at_most_the_cap_of_attributes(profiles):
    cap, per_call = validation.MAX_ATTRIBUTES_PER_USER, validation.MAX_ATTRIBUTES_PER_CALL
    for start in range(0, cap, per_call):
        set_attributes(profiles, IMPORTED, **{f"a{i}": "x" for i in range(start, start + per_call)})
    full = get(profiles)
    assert len(full.attributes) == cap
    # One more is refused, whole: not even the replacement next to it is applied.
    with pytest.raises(grpc.RpcError) as info:
        set_attributes(profiles, IMPORTED, a0="replaced", one_too_many="x")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "attributes" in info.value.details()
    assert get(profiles) == full
    # At the cap, values may still be replaced, and a removal makes room in the same call.
    assert attrs(set_attributes(profiles, STATED, a0="replaced"))["a0"] == ("replaced", STATED)
    swapped = set_attributes(profiles, IMPORTED, a1="", newcomer="x")
    assert len(swapped.attributes) == cap and "newcomer" in attrs(swapped)
    # An import that is ignored (a STATED value stands) does not count as removing one.
    with pytest.raises(grpc.RpcError):
        set_attributes(profiles, IMPORTED, a0="", another="x")


def test_decide_reads_the_attributes_in_its_one_read(store, profiles):
    set_attributes(profiles, STATED, country="fr")
    set_attributes(profiles, IMPORTED, tier="gold")
    inputs = store.read_for_decision(user_id="alice", request_id="r1")
    by_name = {a.name: a for a in inputs.profile.attributes}
    assert {(a.name, a.value, a.source) for a in by_name.values()} == {
        ("country", "fr", AttributeSource.STATED),
        ("tier", "gold", AttributeSource.IMPORTED),
    }
    assert all(a.updated_at > 0 for a in by_name.values())
    assert inputs.replay_decision_id is None


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
    set_attributes(profiles, STATED, country="fr")
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
    assert len(list(store.client.scan_iter(match=f"*{digest}*"))) == 7
    # Every key UserKeys lists but the cooldowns (nothing was dismissed) and the decision
    # set of versions before the decision index.
    assert store.client.exists(*keys.UserKeys.of("alice").all()) == 7
    decision_keys = keys.DecisionKeys.of(shown.decision_id)
    assert store.client.exists(decision_keys.record, decision_keys.outcomes) == 2
    assert store.client.get(decision_keys.owner) == digest
    assert store.client.zscore(keys.AWAITING, shown.decision_id) is not None
    assert store.client.hexists(keys.LEARNED, shown.decision_id)  # the click went to learning

    profiles.DeleteProfile(p.DeleteProfileRequest(user_id="alice"))

    assert list(store.client.scan_iter(match=f"*{digest}*")) == []
    # Its decisions and their outcomes go too: they hold a pseudonym and the context.
    assert store.client.exists(decision_keys.record, decision_keys.outcomes) == 0
    assert not store.client.exists(decision_keys.owner)
    assert store.client.zscore(keys.AWAITING, shown.decision_id) is None  # its reward window
    assert not store.client.hexists(keys.LEARNED, shown.decision_id)
    assert list(store.client.scan_iter(match="*alice*")) == []
    assert get(profiles) == p.Profile(user_id="alice", consent=p.Consent())
    assert get(profiles, "bob").max_messages_per_day == 2  # nobody else is touched
    profiles.DeleteProfile(p.DeleteProfileRequest(user_id="alice"))  # idempotent
