"""Trust rules over random *sequences* of operations, on the core and a real Redis: whatever
a customer says, signals, is shown, dismisses or erases, in any order,

1. a DISLIKEd topic or opted-out channel is never returned;
2. a sensitive offer is returned only with an explicit LIKE of one of its topics;
5. no cap is ever exceeded, and a dismissed offer does not come back inside its cooldown;
6. after DeleteProfile no key of the user remains and the next Decide treats them as new.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tactful import keys
from tactful.caches import CatalogCache, ModelCache
from tactful.decider import Decider
from tactful.domain import (
    ChannelPreference,
    Consent,
    DecideRequest,
    Offer,
    OutcomeEvent,
    OutcomeReport,
    PreferencesUpdate,
    Signal,
    Stance,
    TopicPreference,
)
from tactful.features import FeatureSpace
from tactful.profile_service import ProfileService

from conftest import make_settings

TOPICS = ("running", "yoga", "finance")
CHANNELS = ("web", "email", "push")
CAPS = {"email": 2, "push": 3}  # the defaults of TACTFUL_CHANNEL_CAPS on these channels
USER = "seq-user"

catalogs = st.lists(
    st.builds(
        lambda i, topics, sensitive, channels, cap, priority: Offer(
            f"o{i}",
            "t",
            tuple(sorted(topics)),
            tuple(sorted(channels)),
            priority,
            sensitive,
            max_per_user_per_day=cap,
        ),
        st.integers(0, 50),
        st.sets(st.sampled_from(TOPICS), min_size=1, max_size=2),
        st.booleans(),
        st.sampled_from([CHANNELS, CHANNELS, ("web", "email")]),
        st.sampled_from([0, 0, 1, 2]),
        st.sampled_from([0.1, 0.5, 0.9]),
    ),
    min_size=1,
    max_size=6,
    unique_by=lambda o: o.offer_id,
)
decide_op = st.tuples(
    st.just("decide"),
    st.sampled_from(CHANNELS),
    st.integers(1, 3),
    st.sampled_from([False] * 3 + [True]),
)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("stance"), st.sampled_from(TOPICS), st.sampled_from(list(Stance))),
        st.tuples(st.just("channel"), st.sampled_from(CHANNELS), st.booleans()),
        st.tuples(st.just("own_cap"), st.integers(0, 3)),
        st.tuples(st.just("consent"), st.booleans()),
        st.tuples(st.just("signal"), st.sampled_from(TOPICS), st.floats(0, 100)),
        *[decide_op] * 4,  # mostly decisions: the rules are about what they return
        st.tuples(st.just("dismiss")),
        st.tuples(st.just("dismiss")),
        st.tuples(st.just("delete")),
    ),
    min_size=10,
    max_size=30,
)


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(catalogs, operations)
def test_trust_rules_hold_over_any_sequence(store, catalog, ops):
    store.client.flushdb()
    for offer in catalog:
        store.put_offer(offer=offer)
    cfg = make_settings()
    profiles = ProfileService(store, cfg)
    space = FeatureSpace(cfg.learning.hashed_bits)
    decider = Decider(store, CatalogCache(store), ModelCache(store, space, 1.0), cfg)
    by_id = {o.offer_id: o for o in catalog}

    # What the customer said, and what was shown today, as the test sees it.
    stances: dict[str, Stance] = {}
    opted_out: set[str] = set()
    own_cap = 0
    shown: Counter[tuple[str, str]] = Counter()  # (channel or "*" or "!", offer or "")
    dismissed: set[str] = set()
    last: tuple[str, str] | None = None  # (decision_id, offer_id) of the last shown

    for op in ops:
        kind = op[0]
        if kind == "stance":
            _, topic, stance = op
            profiles.set_preferences(
                PreferencesUpdate(USER, topic_preferences=(TopicPreference(topic, stance),))
            )
            stances.pop(topic, None)
            if stance is not Stance.NEUTRAL:
                stances[topic] = stance
        elif kind == "channel":
            _, channel, opted_in = op
            profiles.set_preferences(
                PreferencesUpdate(USER, channel_preferences=(ChannelPreference(channel, opted_in),))
            )
            (opted_out.discard if opted_in else opted_out.add)(channel)
        elif kind == "own_cap":
            own_cap = op[1]
            profiles.set_preferences(PreferencesUpdate(USER, max_messages_per_day=own_cap))
        elif kind == "consent":
            profiles.set_preferences(PreferencesUpdate(USER, consent=Consent(op[1])))
        elif kind == "signal":
            store.record_signals(user_id=USER, signals=[Signal(op[1], op[2], 1.0)])
        elif kind == "decide":
            _, channel, slots, dry_run = op
            decision = decider.decide(DecideRequest(USER, channel, slots=slots, dry_run=dry_run))
            liked = {t for t, s in stances.items() if s is Stance.LIKE}
            disliked = {t for t, s in stances.items() if s is Stance.DISLIKE}
            interruptions_before = shown[("!", "")]
            if channel in opted_out:
                assert decision.choices == ()
            for choice in decision.choices:
                offer = by_id[choice.offer_id]
                assert disliked.isdisjoint(offer.topics)  # rule 1
                assert not offer.sensitive or not liked.isdisjoint(offer.topics)  # rule 2
                assert offer.offer_id not in dismissed  # rule 5: cooldown
                if not dry_run:
                    shown.update([(channel, ""), ("*", offer.offer_id)])
                    if channel != "web":
                        shown[("!", "")] += 1
                    last = (decision.decision_id, offer.offer_id)
            # Rule 5: no cap is ever exceeded.
            for capped_channel, cap in CAPS.items():
                assert shown[(capped_channel, "")] <= cap
            if own_cap and channel != "web" and not dry_run and decision.choices:
                # The customer's own cap binds every new interruption (one shown before the
                # cap was lowered stays shown, but nothing more goes out).
                assert interruptions_before + len(decision.choices) <= own_cap
            for offer_id, offer in by_id.items():
                if offer.max_per_user_per_day:
                    assert shown[("*", offer_id)] <= offer.max_per_user_per_day
        elif kind == "dismiss" and last is not None:
            decider.record_outcome(
                OutcomeReport(last[0], last[1], OutcomeEvent.DISMISS, f"x-{last[0]}")
            )
            dismissed.add(last[1])
        elif kind == "delete":
            profiles.delete_profile(USER)
            digest = keys.user_digest(USER)
            assert list(store.client.scan_iter(match=f"*{digest}*")) == []  # rule 6
            profile = profiles.get_profile(USER)
            assert replace(profile, consent=Consent()) == type(profile)(user_id=USER)
            stances.clear()
            opted_out.clear()
            own_cap = 0
            shown.clear()
            dismissed.clear()
            last = None
