"""Trust rules as properties: for random catalogs, profiles, signals and attribute updates, on
a real Redis.

Drives the core (``Decider``) directly, so each example costs a few Redis calls; the gRPC
layer is covered by the example-based tests."""

from __future__ import annotations

import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tactful.caches import CatalogCache, ModelCache
from tactful.decider import Decider
from tactful.domain import (
    AttributeSource,
    AttributesUpdate,
    ChannelPreference,
    Consent,
    DecideRequest,
    Offer,
    PreferencesUpdate,
    ReasonCode,
    Signal,
    Stance,
    TopicPreference,
)
from tactful.features import FeatureSpace
from tactful.profile_service import ProfileService

from conftest import make_settings

TOPICS = ("running", "yoga", "cycling", "finance", "travel")

offers_strategy = st.lists(
    st.builds(
        lambda i, topics, priority, sensitive, channels: Offer(
            offer_id=f"o{i}",
            title=f"offer {i}",
            topics=tuple(sorted(topics)),
            channels=tuple(sorted(channels)),
            priority=priority,
            sensitive=sensitive,
        ),
        st.integers(0, 10_000),
        st.sets(st.sampled_from(TOPICS), min_size=1, max_size=3),
        st.sampled_from([0.0, 0.25, 0.5, 1.0, 3.0]),
        st.booleans(),
        st.sets(st.sampled_from(("web", "email")), min_size=1),
    ),
    min_size=1,
    max_size=10,
    unique_by=lambda o: o.offer_id,
)
stances_strategy = st.dictionaries(
    st.sampled_from(TOPICS), st.sampled_from([Stance.LIKE, Stance.DISLIKE])
)
signals_strategy = st.dictionaries(
    st.sampled_from(TOPICS), st.floats(0.0, 1e6, allow_nan=False, allow_infinity=False)
)

FAST = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def setup_world(store, offers, stances, signals, consent, opted_out=False, user="u"):
    store.client.flushdb()
    for offer in offers:
        store.put_offer(offer=offer)
    cfg = make_settings()
    ProfileService(store, cfg).set_preferences(
        PreferencesUpdate(
            user_id=user,
            topic_preferences=tuple(TopicPreference(t, s) for t, s in stances.items()),
            channel_preferences=(ChannelPreference("web", not opted_out),),
            consent=Consent(consent),
        )
    )
    if signals:
        now = time.time()
        store.record_signals(user_id=user, signals=[Signal(t, w, now) for t, w in signals.items()])
    space = FeatureSpace(cfg.learning.hashed_bits)
    return Decider(store, CatalogCache(store), ModelCache(store, space, cfg.learning.kappa), cfg)


def decide(decider, user="u", channel="web"):
    return decider.decide(
        DecideRequest(user_id=user, channel=channel, slots=10, dry_run=True, request_id="same")
    )


@FAST
@given(offers_strategy, stances_strategy, signals_strategy, st.booleans(), st.booleans())
def test_declined_topics_and_channels_are_never_returned(
    store, offers, stances, signals, consent, opted_out
):
    decider = setup_world(store, offers, stances, signals, consent, opted_out)
    by_id = {o.offer_id: o for o in offers}
    disliked = {t for t, s in stances.items() if s is Stance.DISLIKE}
    liked = {t for t, s in stances.items() if s is Stance.LIKE}
    decision = decide(decider)
    if opted_out:
        assert decision.choices == ()
    for choice in decision.choices:
        offer = by_id[choice.offer_id]
        assert disliked.isdisjoint(offer.topics)  # rule 1
        assert not offer.sensitive or not liked.isdisjoint(offer.topics)  # rule 2
        assert "web" in offer.channels


@FAST
@given(offers_strategy, stances_strategy, signals_strategy)
def test_without_consent_signals_change_nothing(store, offers, stances, signals):
    with_signals = decide(setup_world(store, offers, stances, signals, consent=False))
    without = decide(setup_world(store, offers, stances, {}, consent=False))
    assert with_signals.choices == without.choices  # ids, scores, propensities, reasons
    assert all(
        r.code is not ReasonCode.INFERRED_INTEREST for c in with_signals.choices for r in c.reasons
    )


@FAST
@given(
    offers_strategy,
    st.floats(0.0, 1e9, allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, 0.5, 3.0]),
    signals_strategy,
)
def test_explicit_like_is_never_outranked_by_inferred_at_equal_priority(
    store, others, strength, priority, other_signals
):
    """An offer the user likes and one they only showed (any amount of) interest in, at equal
    priority, among random other offers and signals: the liked one always ranks higher."""
    pair = [
        Offer("liked", "liked", ("said",), ("web",), priority),
        Offer("inferred", "inferred", ("seen",), ("web",), priority),
    ]
    signals = {**other_signals, "seen": strength}
    others = others[:8]  # so both of the pair fit in the ten slots
    decider = setup_world(store, pair + others, {"said": Stance.LIKE}, signals, consent=True)
    ranked = [c.offer_id for c in decide(decider).choices]
    assert ranked.index("liked") < ranked.index("inferred")


attribute_calls_strategy = st.lists(
    st.tuples(
        st.sampled_from(AttributeSource),
        st.dictionaries(
            st.sampled_from(("country", "language", "persona")), st.sampled_from(("", "a", "b"))
        ),
    ),
    max_size=8,
)


@FAST
@given(attribute_calls_strategy)
def test_a_stated_attribute_changes_only_when_the_customer_says_so(store, calls):
    """Any sequence of SetAttributes calls from either source: after each, the attributes are
    what the rule says (empty removes; an IMPORTED call skips any attribute the customer
    STATED), so a STATED value is replaced or removed only by a later STATED call."""
    store.client.flushdb()
    profiles = ProfileService(store, make_settings())
    expected: dict[str, tuple[str, AttributeSource]] = {}
    for source, attributes in calls:
        profile = profiles.set_attributes(AttributesUpdate("u", tuple(attributes.items()), source))
        for name, value in attributes.items():
            held = expected.get(name)
            if source is AttributeSource.IMPORTED and held and held[1] is AttributeSource.STATED:
                continue  # the customer's word stands
            if value:
                expected[name] = (value, source)
            else:
                expected.pop(name, None)
        assert {a.name: (a.value, a.source) for a in profile.attributes} == expected
