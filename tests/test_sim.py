"""The simulator of ``tactful.sim``: one seed gives one world, the click model behaves as its
docstring says, and its API conversion yields requests tactful accepts."""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest

from tactful import report, sim
from tactful.v1 import decisioning_pb2_grpc, profiles_pb2

SEED = 20240611


def world(seed: int, users: int = 300, offers: int = 40) -> tuple[sim.Population, sim.Catalog]:
    rng = np.random.default_rng(seed)
    population = sim.Population.generate(users, rng)
    return population, sim.Catalog.generate(offers, population.topics, rng)


def test_one_seed_gives_one_world():
    assert world(SEED) == world(SEED)
    assert world(SEED) != world(SEED + 1)
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    assert [sim.Context.sample(a) for _ in range(50)] == [sim.Context.sample(b) for _ in range(50)]


def test_stated_preferences_are_accurate_but_incomplete():
    population, _ = world(SEED, users=1000)
    stating = [u for u in population.users if u.likes or u.dislikes]
    assert 0.4 < len(stating) / len(population.users) < 0.75
    for user in stating:
        ranked = sorted(user.taste, key=lambda t: -user.taste[t])
        for topic in user.likes:
            assert user.taste[topic] > sim.LIKE_MIN
            assert topic in ranked[: sim.STATED_TOP]
        for topic in user.dislikes:
            assert user.taste[topic] < sim.DISLIKE_MAX
            assert topic in ranked[-sim.STATED_TOP :]
    truly_liked = sum(sum(v > sim.LIKE_MIN for v in u.taste.values()) for u in stating)
    assert sum(len(u.likes) for u in stating) < 0.7 * truly_liked


def test_signals_need_consent_and_are_noisy_taste():
    population, _ = world(SEED, users=1000)
    assert all(not u.signals for u in population.users if not u.consent)
    consenting = [u for u in population.users if u.consent]
    assert 0.35 < len(consenting) / len(population.users) < 0.65
    pairs = [(u.taste[t], w) for u in consenting for t, w in u.signals.items()]
    assert all(w > 0 for _, w in pairs)
    taste, weight = np.array(pairs).T
    assert np.corrcoef(taste, weight)[0, 1] > 0.4  # informative ...
    assert np.mean(taste < 0) > 0.1  # ... but noisy: some signals on topics the user dislikes


def test_click_probability_is_the_documented_formula():
    population, catalog = world(SEED)
    user, offer = population.users[0], catalog.offers[0]
    context = sim.Context("checkout", "mobile")
    effects = [
        user.taste[t]
        + sim.PLACEMENT_EFFECTS["checkout"].get(t, 0.0)
        + sim.DEVICE_EFFECTS["mobile"].get(t, 0.0)
        for t in offer.topics
    ]
    logit = sim.BASE_LOGIT + np.mean(effects) + offer.appeal - sim.FATIGUE * math.log1p(3)
    expected = 1 / (1 + math.exp(-logit))
    assert sim.click_probability(user, offer, context, 3) == pytest.approx(expected)


def test_fatigue_lowers_every_click_probability():
    population, catalog = world(SEED, users=50)
    context = sim.Context("home", "desktop")
    for user in population.users:
        for offer in catalog.offers:
            p = [sim.click_probability(user, offer, context, n) for n in range(6)]
            assert all(a > b for a, b in itertools.pairwise(p))


def test_truly_liked_offers_get_more_clicks_and_context_changes_which():
    population, catalog = world(SEED, users=500)
    home = sim.Context("home", "desktop")
    liked, other = [], []
    for user in population.users:
        for offer in catalog.offers:
            if sim.eligible(user, offer):
                group = liked if not user.likes.isdisjoint(offer.topics) else other
                group.append(sim.click_probability(user, offer, home, 0))
    assert np.mean(liked) > 1.5 * np.mean(other)
    user = population.users[0]
    finance = sim.SimOffer("f", ("finance",), 0.5, True, 0.0)
    books = sim.SimOffer("b", ("books",), 0.5, False, 0.0)

    def p(offer: sim.SimOffer, placement: str) -> float:
        return sim.click_probability(user, offer, sim.Context(placement, "desktop"), 0)

    assert p(finance, "checkout") > p(finance, "home") > p(finance, "article")
    assert p(books, "article") > p(books, "home") > p(books, "checkout")


def test_sample_reward_clicks_at_the_click_probability():
    population, catalog = world(SEED, users=5)
    user, offer, context = population.users[0], catalog.offers[0], sim.Context("home", "mobile")
    rng = np.random.default_rng(1)
    draws = [sim.sample_reward(user, offer, context, 1, rng) for _ in range(20000)]
    assert set(draws) <= {0.0, 1.0}
    assert np.mean(draws) == pytest.approx(
        sim.click_probability(user, offer, context, 1), abs=0.015
    )


def test_priority_is_only_weakly_correlated_with_appeal():
    catalog = sim.Catalog.generate(3000, sim.TOPICS, np.random.default_rng(SEED))
    priority = [o.priority for o in catalog.offers]
    assert all(0 < p < 1 for p in priority)
    assert 0.1 < np.corrcoef(priority, [o.appeal for o in catalog.offers])[0, 1] < 0.6
    assert all(o.sensitive == bool(sim.SENSITIVE_TOPICS & set(o.topics)) for o in catalog.offers)


def test_the_api_conversion_loads_a_world_tactful_decides_on_as_the_sim_predicts(channel, profiles):
    population, catalog = world(SEED, users=40, offers=10)
    sim.load(channel, population, catalog)
    for user in population.users[:5]:
        profile = profiles.GetProfile(profiles_pb2.GetProfileRequest(user_id=user.user_id))
        stances = {p.topic: p.stance for p in profile.topic_preferences}
        assert {t for t, s in stances.items() if s == profiles_pb2.STANCE_LIKE} == user.likes
        assert profile.consent.inferred_personalization == user.consent
        assert {s.topic for s in profile.signals} == set(user.signals)
    decide = decisioning_pb2_grpc.DecisioningStub(channel).Decide
    rng = np.random.default_rng(SEED)
    for user in population.users:
        context = sim.Context.sample(rng)
        reply = decide(sim.decide_request(user, context, slots=10, dry_run=True))
        expected = {o.offer_id for o in catalog.offers if sim.eligible(user, o)}
        assert {c.offer_id for c in reply.choices} == expected


def test_stated_personas_are_segments_tactful_logs(channel, profiles, store):
    rng = np.random.default_rng(SEED)
    population = sim.Population.generate(30, rng, persona_share=0.5)
    catalog = sim.Catalog.generate(8, population.topics, rng)
    newcomers = population.newcomers(10, rng, persona_share=1.0)
    assert 5 < sum(u.states_persona for u in population.users) < 25
    assert all(u.states_persona and not u.consent and not u.signals for u in newcomers)
    assert [u.user_id for u in newcomers] == [f"sim-user-{i:05d}" for i in range(30, 40)]
    # Same personas: a newcomer's taste is its persona's plus individual noise.
    for user in newcomers:
        base = population.personas[user.persona]
        gap = max(abs(user.taste[t] - v) for t, v in zip(population.topics, base, strict=True))
        assert gap < 5 * sim.INDIVIDUAL_SCALE
    assert not any(u.states_persona for u in world(SEED, users=50)[0].users)

    started = time.time()
    sim.load(channel, population, catalog, newcomers=newcomers)
    for user in (*population.users, *newcomers):
        profile = profiles.GetProfile(profiles_pb2.GetProfileRequest(user_id=user.user_id))
        attributes = {a.name: (a.value, a.source) for a in profile.attributes}
        if user.states_persona:
            stated = (sim.persona_name(user.persona), profiles_pb2.ATTRIBUTE_SOURCE_STATED)
            assert attributes == {"persona": stated}
        else:
            assert attributes == {}
    decide = decisioning_pb2_grpc.DecisioningStub(channel).Decide
    expected = {}
    for user in (*population.users, *newcomers):
        reply = decide(sim.decide_request(user, sim.Context.sample(rng)))
        if reply.decision_id:
            member = [sim.persona_segment_id(user.persona)] if user.states_persona else []
            expected[reply.decision_id] = member
    records = report.read_log(store.client, started - 1, time.time() + 1)
    assert {r.payload["decision_id"]: r.payload["segments"] for r in records} == expected
