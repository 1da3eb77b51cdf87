"""Decide rules 1-6 of the foundation, through real gRPC stubs on a real redis-server."""

from __future__ import annotations

import time

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from tactful.privacy import in_control_group
from tactful.transport.server import build_server
from tactful.v1 import catalog_pb2, decisioning_pb2_grpc, profiles_pb2_grpc
from tactful.v1 import decisioning_pb2 as d
from tactful.v1 import profiles_pb2 as p

from conftest import RoundTrips, make_settings, make_store, offer, redis_url

LIKE, DISLIKE, NEUTRAL = p.STANCE_LIKE, p.STANCE_DISLIKE, p.STANCE_NEUTRAL


def put(catalog, *offers):
    for o in offers:
        catalog.PutOffer(catalog_pb2.PutOfferRequest(offer=o))


def decide(decisioning, user="alice", channel="web", slots=10, **kw) -> d.DecideResponse:
    return decisioning.Decide(d.DecideRequest(user_id=user, channel=channel, slots=slots, **kw))


def ids(response: d.DecideResponse) -> list[str]:
    return [c.offer_id for c in response.choices]


def prefs(profiles, user="alice", **kw):
    return profiles.SetPreferences(p.SetPreferencesRequest(user_id=user, **kw))


def topic(name, stance):
    return p.TopicPreference(topic=name, stance=stance)


def codes(choice) -> set[int]:
    return {r.code for r in choice.reasons}


def evidence(choice) -> list[int]:
    """The reasons that say what a choice rests on: all but EXPLORATION, which only says how
    it was drawn (random, so tests do not pin it)."""
    return [r.code for r in choice.reasons if r.code != d.REASON_CODE_EXPLORATION]


# Rule 1 -------------------------------------------------------------------------------------


def test_disliked_topic_is_never_returned(catalog, decisioning, profiles):
    put(catalog, offer("run", ("running",), priority=0.9), offer("yoga", ("yoga",), priority=0.1))
    assert ids(decide(decisioning))[0] == "run"
    prefs(profiles, topic_preferences=[topic("running", DISLIKE)])
    assert ids(decide(decisioning)) == ["yoga"]
    # Even when asked for explicitly.
    assert ids(decide(decisioning, candidate_offer_ids=["run"])) == []


def test_offer_sharing_one_disliked_topic_is_excluded(catalog, decisioning, profiles):
    put(catalog, offer("mixed", ("running", "nutrition"), priority=0.9), offer("other", ("yoga",)))
    prefs(profiles, topic_preferences=[topic("nutrition", DISLIKE), topic("running", LIKE)])
    assert ids(decide(decisioning)) == ["other"]


def test_neutral_clears_a_dislike(catalog, decisioning, profiles):
    put(catalog, offer("run", ("running",)))
    prefs(profiles, topic_preferences=[topic("running", DISLIKE)])
    assert decide(decisioning).hold_reason == d.HOLD_REASON_NO_ELIGIBLE_OFFER
    prefs(profiles, topic_preferences=[topic("running", NEUTRAL)])
    assert ids(decide(decisioning)) == ["run"]


def test_opted_out_channel_is_held(catalog, decisioning, profiles):
    put(catalog, offer("run", ("running",), channels=["web", "email"]))
    prefs(profiles, channel_preferences=[p.ChannelPreference(channel="email", opted_in=False)])
    held = decide(decisioning, channel="email")
    assert held.choices == [] and held.hold_reason == d.HOLD_REASON_CHANNEL_OPTED_OUT
    assert ids(decide(decisioning, channel="web")) == ["run"]
    prefs(profiles, channel_preferences=[p.ChannelPreference(channel="email", opted_in=True)])
    assert ids(decide(decisioning, channel="email")) == ["run"]


def test_offer_not_on_the_channel_is_not_returned(catalog, decisioning):
    put(catalog, offer("sms-only", channels=["sms"]), offer("web-only", channels=["web"]))
    assert ids(decide(decisioning, channel="web")) == ["web-only"]
    assert ids(decide(decisioning, channel="push")) == []


# Rule 2 -------------------------------------------------------------------------------------


def test_sensitive_offer_needs_an_explicit_like(catalog, decisioning, profiles):
    put(catalog, offer("loan", ("finance",), sensitive=True, priority=0.9), offer("plain"))
    assert ids(decide(decisioning)) == ["plain"]
    # Strong inferred interest with consent is not enough.
    prefs(profiles, consent=p.Consent(inferred_personalization=True))
    profiles.RecordSignals(
        p.RecordSignalsRequest(user_id="alice", signals=[p.Signal(topic="finance", weight=100)])
    )
    assert ids(decide(decisioning)) == ["plain"]
    prefs(profiles, topic_preferences=[topic("finance", LIKE)])
    assert ids(decide(decisioning)) == ["loan", "plain"]


# Rule 3 -------------------------------------------------------------------------------------


def _strip_ids(response: d.DecideResponse) -> d.DecideResponse:
    response.decision_id = ""
    return response


def test_without_consent_signals_change_nothing(catalog, decisioning, profiles):
    put(
        catalog,
        offer("a", ("running",), priority=0.5),
        offer("b", ("cycling",), priority=0.5),
        offer("c", ("yoga",), priority=0.6),
    )
    signals = p.RecordSignalsRequest(
        user_id="alice",
        signals=[p.Signal(topic="running", weight=50), p.Signal(topic="cycling", weight=5)],
    )
    # The same request_id draws the same exploration, so only the signals differ.
    before = _strip_ids(decide(decisioning, dry_run=True, request_id="r"))
    assert profiles.RecordSignals(signals).stored is False  # not even kept without consent
    after = _strip_ids(decide(decisioning, dry_run=True, request_id="r"))
    assert after == before  # ranking, scores and reasons alike
    assert all(d.REASON_CODE_INFERRED_INTEREST not in codes(c) for c in after.choices)
    # Consent is what turns them on; withdrawing it turns them off again, and erases them.
    prefs(profiles, consent=p.Consent(inferred_personalization=True))
    assert profiles.RecordSignals(signals).stored is True
    with_consent = decide(decisioning, dry_run=True, slots=3)
    assert ids(with_consent)[0] == "a"
    assert d.REASON_CODE_INFERRED_INTEREST in codes(with_consent.choices[0])
    withdrawn = prefs(profiles, consent=p.Consent(inferred_personalization=False))
    assert list(withdrawn.signals) == []
    assert _strip_ids(decide(decisioning, dry_run=True, request_id="r")) == before


def test_consent_defaults_to_false(profiles):
    profile = prefs(profiles, topic_preferences=[topic("running", LIKE)])
    assert profile.consent.inferred_personalization is False


# Rule 4 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("strength", [0.01, 1.0, 1e3, 1e6])
def test_explicit_like_outranks_inferred_of_any_strength(catalog, decisioning, profiles, strength):
    put(
        catalog,
        offer("liked", ("running",), priority=0.5),
        offer("inferred", ("yoga",), priority=0.5),
    )
    prefs(
        profiles,
        topic_preferences=[topic("running", LIKE)],
        consent=p.Consent(inferred_personalization=True),
    )
    profiles.RecordSignals(
        p.RecordSignalsRequest(user_id="alice", signals=[p.Signal(topic="yoga", weight=strength)])
    )
    response = decide(decisioning)
    assert ids(response) == ["liked", "inferred"]
    assert response.choices[0].score > response.choices[1].score
    liked, inferred = response.choices
    assert evidence(liked) == [d.REASON_CODE_EXPLICIT_LIKE]
    assert liked.reasons[0].detail == "you said you like running"
    assert evidence(inferred) == [d.REASON_CODE_INFERRED_INTEREST]
    assert "yoga" in inferred.reasons[0].detail


def test_choices_are_ordered_by_score(catalog, decisioning):
    put(catalog, *(offer(f"o{i}", priority=i / 10) for i in range(8)))
    response = decide(decisioning, slots=5)
    scores = [c.score for c in response.choices]
    assert scores == sorted(scores, reverse=True) and len(scores) == 5
    assert all(0 < c.propensity <= 1.0 for c in response.choices)
    assert response.arm == d.ARM_PERSONALIZED
    assert response.model_version


def test_control_arm_ranks_by_priority_alone(store, catalog, profiles):
    settings = make_settings(control_share=0.5)
    control_user = next(
        f"user-{i}"
        for i in range(1000)
        if in_control_group(f"user-{i}", salt=settings.policy.control_salt, share=0.5)
    )
    running = build_server(settings, store, port=0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            stub = decisioning_pb2_grpc.DecisioningStub(ch)
            put(catalog, offer("liked", ("running",), priority=0.2), offer("top", priority=0.8))
            prefs(profiles, user=control_user, topic_preferences=[topic("running", LIKE)])
            response = decide(stub, user=control_user)
            assert response.arm == d.ARM_CONTROL
            assert ids(response) == ["top", "liked"]
            assert all(codes(c) == {d.REASON_CODE_CONTROL_GROUP} for c in response.choices)
            # The same user lands in the same arm every time.
            assert decide(stub, user=control_user, dry_run=True).arm == d.ARM_CONTROL
    finally:
        running.stop(None)


# Rule 5 -------------------------------------------------------------------------------------


def test_unknown_user_gets_business_priority(catalog, decisioning):
    put(
        catalog, offer("low", priority=0.1), offer("high", priority=0.9), offer("mid", priority=0.5)
    )
    response = decide(decisioning, user="never-seen-before", slots=3)
    assert ids(response) == ["high", "mid", "low"]
    assert all(evidence(c) == [d.REASON_CODE_BUSINESS_PRIORITY] for c in response.choices)
    assert response.arm == d.ARM_PERSONALIZED and response.hold_reason == 0


def test_empty_catalog_holds_with_no_eligible_offer(decisioning):
    response = decide(decisioning)
    assert response.choices == [] and response.hold_reason == d.HOLD_REASON_NO_ELIGIBLE_OFFER
    assert response.decision_id and response.arm == d.ARM_PERSONALIZED


def test_inactive_offers_are_not_returned(catalog, decisioning):
    now = int(time.time())
    put(
        catalog,
        offer("past", end_time=Timestamp(seconds=now - 10)),
        offer("future", start_time=Timestamp(seconds=now + 3600)),
        offer("open", start_time=Timestamp(seconds=now - 10), end_time=Timestamp(seconds=now + 60)),
    )
    assert ids(decide(decisioning)) == ["open"]


def test_candidates_restrict_the_choice_and_unknown_ids_are_skipped(catalog, decisioning):
    put(catalog, offer("a", priority=0.9), offer("b", priority=0.5), offer("c", priority=0.1))
    response = decide(decisioning, candidate_offer_ids=["c", "b", "nope", "b"])
    assert ids(response) == ["b", "c"]


# Rule 6 -------------------------------------------------------------------------------------


def test_hot_path_round_trips(redis_proc, redisdb, settings, catalog):
    """Rule 6, with the contact policy: one read (profile, counters, cooldowns, attributes,
    catalog and model versions), then one write that runs the atomic caps script and logs the
    decision."""
    put(catalog, *(offer(f"o{i}", (f"t{i % 7}",), priority=i / 100) for i in range(60)))
    trips = RoundTrips()
    counted = make_store(redis_url(redis_proc), settings, connection_class=trips.connection_class())
    running = build_server(settings, counted, port=0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            stub = decisioning_pb2_grpc.DecisioningStub(ch)
            decide(stub, user="warmup")  # loads the catalog, and the caps script into Redis
            profiles_pb2_grpc.ProfilesStub(ch).SetAttributes(
                p.SetAttributesRequest(
                    user_id="bob",
                    attributes={"country": "fr", "language": "fr-FR"},
                    source=p.ATTRIBUTE_SOURCE_STATED,
                )
            )
            trips.count = 0
            candidates = [f"o{i}" for i in range(50)]
            response = decide(stub, user="bob", candidate_offer_ids=candidates, slots=3)
            assert len(response.choices) == 3
            assert trips.count == 2  # read; caps script + decision log
            trips.count = 0
            decide(stub, user="bob", candidate_offer_ids=candidates, dry_run=True)
            assert trips.count == 1  # a dry run counts and logs nothing
    finally:
        running.stop(None)
        counted.client.close()


def test_catalog_change_is_seen_by_every_process(redis_proc, redisdb, store, settings, catalog):
    """Two servers (as two processes would) share one Redis: an offer put through one is
    decided on by the other on its next request."""
    other_store = make_store(redis_url(redis_proc), settings)
    other = build_server(settings, other_store, port=0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{other.port}") as ch:
            stub = decisioning_pb2_grpc.DecisioningStub(ch)
            assert ids(decide(stub)) == []
            put(catalog, offer("new", priority=0.3))
            assert ids(decide(stub)) == ["new"]
            catalog.DeleteOffer(catalog_pb2.DeleteOfferRequest(offer_id="new"))
            assert ids(decide(stub)) == []
    finally:
        other.stop(None)
        other_store.client.close()


def test_decision_is_logged_with_context_and_propensities(store, catalog, decisioning):
    import json

    from tactful import keys

    put(catalog, offer("a", priority=0.9), offer("b", priority=0.1))
    response = decide(
        decisioning,
        slots=2,
        placement="home_hero",
        numeric_context={"cart_value": 42.5},
        categorical_context={"device": "mobile"},
    )
    raw = store.client.get(keys.DecisionKeys.of(response.decision_id).record)
    logged = json.loads(raw)
    assert logged["decision_id"] == response.decision_id
    assert logged["offer_ids"] == ["a", "b"]
    assert [c["propensity"] for c in logged["choices"]] == [c.propensity for c in response.choices]
    assert set(logged["features"]) == {"a", "b"}  # x of each (x, a, r, p), for the learner
    assert logged["model_version"] == response.model_version
    assert logged["placement"] == "home_hero"
    assert logged["numeric_context"] == {"cart_value": 42.5}
    assert logged["categorical_context"] == {"device": "mobile"}
    assert logged["arm"] == "PERSONALIZED"
    assert "alice" not in raw  # a keyed pseudonym stands for the user
    assert store.client.ttl(keys.DecisionKeys.of(response.decision_id).record) > 0


def test_a_data_sets_hundred_and_more_numeric_features_are_taken_whole(store, catalog, decisioning):
    """128 numeric values (a data set's raw features) are answered and logged whole; one
    more is INVALID_ARGUMENT (tests/test_bad_input.py)."""
    import json

    from tactful import keys

    put(catalog, offer("a", priority=0.9))
    numbers = {f"f{i}": float(i) for i in range(128)}
    response = decide(decisioning, numeric_context=numbers)
    logged = json.loads(store.client.get(keys.DecisionKeys.of(response.decision_id).record))
    assert logged["numeric_context"] == numbers


def test_dry_run_counts_and_logs_nothing(store, catalog, decisioning, profiles):
    from tactful import keys

    put(catalog, offer("a"))
    response = decide(decisioning, dry_run=True)
    assert ids(response) == ["a"] and response.arm == d.ARM_PERSONALIZED
    assert store.client.get(keys.DecisionKeys.of(response.decision_id).record) is None
    assert list(profiles.GetProfile(p.GetProfileRequest(user_id="alice")).contact_counters) == []
    decide(decisioning)
    counters = profiles.GetProfile(p.GetProfileRequest(user_id="alice")).contact_counters
    assert {(c.channel, c.offer_id, c.count) for c in counters} == {
        ("*", "", 1),  # every channel
        ("*", "a", 1),  # the offer, every channel
        ("web", "", 1),
        ("web", "a", 1),
    }


def test_request_id_replays_the_same_decision(catalog, decisioning):
    put(catalog, offer("a", priority=0.9), offer("b", priority=0.1))
    first = decide(decisioning, request_id="render-123", slots=2)
    put(catalog, offer("c", priority=5.0))
    again = decide(decisioning, request_id="render-123", slots=2)
    assert again == first
    assert decide(decisioning, request_id="render-124", slots=2).decision_id != first.decision_id


def test_a_replay_never_shows_what_was_declined_since(catalog, decisioning, profiles):
    put(catalog, offer("run", ("running",), priority=0.9), offer("yoga", ("yoga",), priority=0.5))
    first = decide(decisioning, request_id="render-9", slots=2)
    assert sorted(ids(first)) == ["run", "yoga"]
    prefs(profiles, topic_preferences=[topic("running", DISLIKE)])
    again = decide(decisioning, request_id="render-9", slots=2)
    assert again.decision_id == first.decision_id and ids(again) == ["yoga"]
    prefs(profiles, channel_preferences=[p.ChannelPreference(channel="web", opted_in=False)])
    held = decide(decisioning, request_id="render-9", slots=2)
    assert held.choices == [] and held.hold_reason == d.HOLD_REASON_CHANNEL_OPTED_OUT


def test_a_request_id_older_than_its_ttl_is_a_new_request(store, catalog):
    settings = make_settings(request_id_ttl_seconds=1)
    put(catalog, offer("a"))
    running = build_server(settings, store, port=0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            stub = decisioning_pb2_grpc.DecisioningStub(ch)
            first = decide(stub, request_id="again")
            assert decide(stub, request_id="again").decision_id == first.decision_id
            time.sleep(1.2)
            assert decide(stub, request_id="again").decision_id != first.decision_id
    finally:
        running.stop(None)


def test_contacts_are_counted_even_after_redis_forgot_its_scripts(store, catalog, decisioning):
    """The caps script rides in the log's write by its SHA; after a SCRIPT FLUSH (as after a
    Redis restart) the decision is still logged and its contact still counted, once."""
    put(catalog, offer("a", channels=["email"]))
    store.client.script_flush()
    first = decide(decisioning, channel="email")
    assert ids(first) == ["a"]
    store.client.script_flush()
    assert ids(decide(decisioning, channel="email")) == ["a"]
    assert decide(decisioning, channel="email").hold_reason == d.HOLD_REASON_FATIGUE_CAP
    from tactful import keys

    assert store.client.get(keys.DecisionKeys.of(first.decision_id).record) is not None


@pytest.mark.both_stores
@pytest.mark.parametrize("capped", [False, True], ids=["served", "held"])
def test_concurrent_calls_with_one_new_request_id_make_one_decision_counted_once(
    store, catalog, decisioning, profiles, capped
):
    """A page's retry racing its original (same new request_id, at once, on 8 threads):
    every answer is the one decision, its contact is counted once, and no other decision is
    left in the log to be learned from. The same when the answer is a hold."""
    import threading

    from tactful import keys

    put(catalog, offer("a", channels=["email"], priority=0.9), offer("b", channels=["email"]))
    users = [f"racer-{n}" for n in range(3)]
    for user in users:
        prefs(profiles, user=user, max_messages_per_day=1)
        if capped:  # its one message of the day is spent: every answer is a FATIGUE_CAP hold
            decide(decisioning, user=user, channel="email", slots=1)
    for user in users:
        barrier = threading.Barrier(8)
        answers: list[d.DecideResponse] = []

        def call(user: str = user, barrier: threading.Barrier = barrier, out=answers) -> None:
            barrier.wait()
            out.append(decide(decisioning, user, "email", slots=1, request_id="r-1"))

        threads = [threading.Thread(target=call) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len({answer.decision_id for answer in answers}) == 1, user
        if capped:
            assert all(a.hold_reason == d.HOLD_REASON_FATIGUE_CAP for a in answers)
        else:
            assert all(ids(answer) == ["a"] for answer in answers)
        k = keys.UserKeys.of(user)
        assert (
            store.client.hget(
                k.contacts, next(f for f in store.client.hkeys(k.contacts) if f.endswith("|email|"))
            )
            == "1"
        )
        assert store.client.zcard(k.decided) == 1 + capped
    assert store.client.zcard(keys.AWAITING) == len(users)  # served decisions only
