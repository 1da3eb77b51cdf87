"""The learning loop on a real redis-server and real gRPC: features, the ridge model and its
guarantee, exploration propensities, the learner's exactly-once delivery, rollback (those
marked ``both_stores`` on a Redis Cluster too)."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import time
import zlib
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tactful import changes, keys, learner_state, metrics, regression
from tactful.bandit import (
    MAX_GAMMA,
    LinearModel,
    SnapshotError,
    draw,
    evidence_free,
    gamma_for_share,
    igw_probabilities,
    pick_slate,
    prior_theta,
    project,
)
from tactful.batches import batch_of
from tactful.caches import ModelCache
from tactful.domain import Offer
from tactful.features import (
    BIAS,
    CONTACTS_TODAY,
    EXPLICIT_LIKE,
    FEATURE_SETS,
    INFERRED_INTEREST,
    N_DENSE,
    PRIORITY,
    FeatureSpace,
    RequestContext,
    SparseVector,
    UserEvidence,
    dot_many,
)
from tactful.learner import Learner
from tactful.learner_state import Delta, StateError
from tactful.regression import OnlineRegression
from tactful.store.model_store import ModelStore
from tactful.store.reward_vectors import pack
from tactful.store.wire import undecoded
from tactful.transport.server import build_server
from tactful.v1 import catalog_pb2, decisioning_pb2_grpc
from tactful.v1 import decisioning_pb2 as d

from conftest import decide_with_model, make_settings, make_store, offer, redis_url, until

SPACE = FeatureSpace(9)  # small, for the model's own tests
SERVED = FeatureSpace(make_settings().learning.hashed_bits)  # what the test servers use


@pytest.fixture
def models(store) -> ModelStore:
    return ModelStore(store.client)


def new_learner(models: ModelStore, **learning) -> Learner:
    cfg = make_settings().learning
    learning = {"publish_interval_ms": 0, "checkpoint_interval_seconds": 0, **learning}
    cfg = dataclasses.replace(cfg, **learning)
    return Learner(models, SERVED, cfg, consumer="test-learner")


# --- features and model -------------------------------------------------------------------


def test_sparse_dot_matches_the_dense_product():
    ctx = RequestContext("web", "home", 14, (("device", "mobile"),), (("cart", 42.0),))
    offers = [Offer(f"o{i}", "t", ("running", f"t{i}"), ("web",), i / 10) for i in range(5)]
    vectors = [
        SPACE.featurize(ctx, o, UserEvidence(i % 2 == 0, 0.3, 2)) for i, o in enumerate(offers)
    ]
    theta = np.random.default_rng(1).normal(size=SPACE.dim)
    dense = np.zeros((len(vectors), SPACE.dim))
    for row, x in enumerate(vectors):
        np.add.at(dense[row], list(x.indices), list(x.values))
    assert np.allclose(dot_many(theta, vectors), dense @ theta)


def expected_vector(
    ctx: RequestContext,
    o: Offer,
    liked: bool,
    inferred: float,
    contacts: int,
    feature_set: str = "shared+offer",
    segments: tuple[str, ...] = (),
):
    """The vector the module doc of tactful.features describes, built name by name."""
    indices, values = [BIAS, PRIORITY], [1.0, o.priority]
    for present, index, value in (
        (liked, EXPLICIT_LIKE, 1.0),
        (inferred > 0, INFERRED_INTEREST, inferred),
        (contacts > 0, CONTACTS_TODAY, math.log1p(contacts)),
    ):
        if present:
            indices.append(index)
            values.append(value)
    names: list[str] = []
    if feature_set == "shared+offer":
        names += [f"o:{o.offer_id}", f"o:{o.offer_id}|c:{ctx.channel}"]
        values += [1.0, 1.0]
    units = [f"o:{o.offer_id}"] if feature_set == "offer" else [f"t:{t}" for t in o.topics]
    weight = 1 / math.sqrt(len(units))
    for t in units:
        topic_names = [t, f"{t}|c:{ctx.channel}"]
        topic_names += [f"{t}|p:{ctx.placement}"] if ctx.placement else []
        topic_names += [f"{t}|h:{ctx.hour // 3}"]
        topic_names += [f"{t}|k:{k}={v}" for k, v in ctx.categorical]
        names += topic_names + [f"{t}|n:{k}" for k, _ in ctx.numeric]
        values += [weight] * len(topic_names)
        values += [weight * math.copysign(math.log1p(abs(v)), v) for _, v in ctx.numeric]
    names += [f"s:{s}" for s in segments]
    values += [1.0] * len(segments)
    names += [f"{u}|s:{s}" for u in units for s in segments]
    values += [weight] * (len(units) * len(segments))
    # Each unit's numeric block: the unit's own feature and its numeric crosses, by position.
    dense = len(indices)
    blocks = tuple(
        tuple(dense + names.index(n) for n in [u, *(f"{u}|n:{k}" for k, _ in ctx.numeric)])
        for u in units
        if ctx.numeric
    )
    indices += [N_DENSE + (zlib.crc32(n.encode()) & (2**SPACE.hashed_bits - 1)) for n in names]
    return SparseVector(tuple(indices), tuple(values), blocks)


@pytest.mark.parametrize("feature_set", FEATURE_SETS)
def test_batched_features_are_the_documented_layout_in_every_context(feature_set):
    """Published snapshots depend on the layout: the cached, batched featurisation must give
    exactly the documented vectors, also when one offer is seen again in other contexts."""
    space = FeatureSpace(SPACE.hashed_bits, feature_set)
    offers = [
        Offer("o1", "t", ("running", "yoga"), ("web",), 0.4),
        Offer("o2", "t", ("yoga",), ("web", "app"), 0.9),
        Offer("o3", "t", ("a", "b", "c"), ("app",), 0.0),
    ]
    contexts = [
        RequestContext("web", "home", 14, (("device", "mobile"),), (("cart", 42.0),)),
        RequestContext("web", "home", 14, (("device", "tablet"),), (("cart", -3.0),)),
        RequestContext("web", "", 2, (), (("cart", 42.0), ("visits", 0.0))),
        RequestContext("app", "home", 23, (("device", "mobile"), ("country", "FR")), ()),
    ]
    memberships = [(), ("runners",), ("eu", "runners"), ()]
    for ctx, segments in zip(contexts * 2, memberships * 2, strict=True):
        for contacts in (0, 3):
            liked, inferred = [True, False, True], [0.0, 0.25, 0.5]
            batch = space.featurize_many(ctx, offers, liked, inferred, contacts, segments)
            expected = [
                expected_vector(ctx, o, lk, inf, contacts, feature_set, segments)
                for o, lk, inf in zip(offers, liked, inferred, strict=True)
            ]
            assert [batch.vector(i) for i in range(len(offers))] == expected
            theta = np.random.default_rng(contacts).normal(size=SPACE.dim)
            assert np.array_equal(batch.dot(theta), dot_many(theta, expected))


def test_each_feature_set_has_its_own_layout_and_refuses_the_others_snapshots():
    spaces = [FeatureSpace(SPACE.hashed_bits, name) for name in FEATURE_SETS]
    assert spaces[0].layout == "tactful-features-1/9"  # snapshots published before sets existed
    assert len({space.layout for space in spaces}) == len(FEATURE_SETS)
    snapshot = LinearModel("1", prior_theta(SPACE.dim), spaces[1].layout).to_bytes()
    with pytest.raises(SnapshotError):
        LinearModel.from_bytes(snapshot, spaces[0])
    assert LinearModel.from_bytes(snapshot, spaces[1]).layout == spaces[1].layout


def test_without_consent_the_inferred_feature_is_absent():
    ctx = RequestContext("web", "", 9)
    o = Offer("o", "t", ("yoga",), ("web",), 0.5)
    x = SPACE.featurize(ctx, o, UserEvidence(liked=False, inferred=0.0, contacts_today=0))
    assert INFERRED_INTEREST not in x.indices and EXPLICIT_LIKE not in x.indices


sparse_vectors = st.builds(
    lambda idx, vals: SparseVector(
        tuple(idx), tuple(vals[: len(idx)] + [1.0] * len(idx))[: len(idx)]
    ),
    st.lists(st.integers(0, SPACE.dim - 1), min_size=1, max_size=12),
    st.lists(st.floats(-3, 3, allow_nan=False), max_size=12),
)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(sparse_vectors, st.floats(-5, 5, allow_nan=False)), max_size=40),
    st.floats(1.0, 4.0),
    st.floats(0.0, 1e9, allow_nan=False),
    st.floats(0.0, 100.0),
    st.lists(st.floats(0.0, 1e6), min_size=N_DENSE, max_size=N_DENSE),
)
def test_explicit_outranks_inferred_after_any_updates(updates, kappa, strength, bonus, foreign):
    """Whatever rewards the learner sees (adversarial ones included), the published model
    scores an explicitly liked offer above one with an inferred signal of any strength when
    all else is equal, with any exploration bonus: the learner's own variances, or any a
    foreign snapshot carries for the dense weights, once a server has loaded it."""
    learner = OnlineRegression(SPACE, l2=1.0, rate=1.0, prior=prior_theta(SPACE.dim))
    for x, reward in updates:
        learner.learn(batch_of([(list(x.indices), list(x.values), [])], [reward]))
    theta = project(learner.weights, kappa)
    assert theta[EXPLICIT_LIKE] >= kappa * theta[INFERRED_INTEREST] >= 0
    ctx = RequestContext("web", "", 12)
    o = Offer("same", "t", ("x",), ("web",), 0.5)
    liked = SPACE.featurize(ctx, o, UserEvidence(True, 0.0, 0))
    inferred = SPACE.featurize(ctx, o, UserEvidence(False, strength / (1 + strength), 0))
    scores = dot_many(theta, [liked, inferred])
    assert scores[0] > scores[1]
    squashed = strength / (1 + strength)
    batch = SPACE.featurize_many(ctx, [o, o], [True, False], [0.0, squashed], 0)
    tampered = learner.variance()
    tampered[:N_DENSE] = foreign  # large variances on the explicit and inferred weights
    for variance in (learner.variance(), tampered):
        published = LinearModel("v", theta, SPACE.layout, learner.updates, variance)
        served = LinearModel.from_bytes(published.to_bytes(), SPACE)
        with_bonus = served.scores(batch, bonus)
        assert with_bonus[0] > with_bonus[1]
        spread = batch.spread(served.variance)
        assert spread[0] == spread[1]  # the same bonus: only the evidence differs


def block_rewards(seed: int, n: int) -> tuple[np.ndarray, list[tuple[list[float], float]]]:
    """Rewards of vectors that are one numeric block (4 hashed features), values in [-1, 1]
    and the first all ones, so each feature's scale is 1 from the first reward on."""
    rng = np.random.default_rng(seed)
    indices = rng.choice(np.arange(N_DENSE, SPACE.dim), size=4, replace=False)
    rewards = [([1.0] * 4, float(rng.random()))]
    rewards += [(list(rng.uniform(-1, 1, 4)), float(rng.random())) for _ in range(n - 1)]
    return indices, rewards


def ridge_solution(indices: np.ndarray, rewards, l2: float) -> np.ndarray:
    z = np.array([values for values, _ in rewards])
    r = np.array([reward for _, reward in rewards])
    return np.linalg.solve(l2 * np.eye(len(indices)) + z.T @ z, z.T @ r)


@pytest.mark.parametrize("one_batch", [False, True])
def test_a_numeric_block_is_learned_as_ridge_exactly(one_batch):
    """Within a block, rewards one at a time (Sherman-Morrison) or all in one batch give the
    ridge solution: the block's features are fitted jointly, not one by one."""
    indices, rewards = block_rewards(3, 30)
    learner = OnlineRegression(SPACE, l2=2.0, rate=1.0, prior=prior_theta(SPACE.dim))
    vectors = [(indices.tolist(), values, [[0, 1, 2, 3]]) for values, _ in rewards]
    if one_batch:
        learner.learn(batch_of(vectors, [r for _, r in rewards]))
    else:
        for vector, (_, reward) in zip(vectors, rewards, strict=True):
            learner.learn(batch_of([vector], [reward]))
    assert np.allclose(learner.weights[indices], ridge_solution(indices, rewards, 2.0))
    assert learner.updates == 30


@pytest.mark.parametrize("batch", [1, 7, 40])
def test_twins_are_learned_as_one_feature_standing_for_them_all(batch):
    """Features seen so far in exactly the same rewards (an offer's bias and its bias on the
    site's one channel, say) are learned as one feature would be that stands for them all
    (value sqrt(3) for three of value 1): after any rewards, one at a time or in batches,
    they predict what it predicts. Taken one by one, each took a share of every residual as
    if it alone explained it: three twins moved their prediction about three times as far."""
    rng = np.random.default_rng(batch)
    twins = rng.choice(np.arange(N_DENSE, SPACE.dim), size=4, replace=False)
    one, twins = twins[:1], twins[1:]
    rewards = [float(rng.random() < 0.3) for _ in range(40)]
    model = OnlineRegression(SPACE, l2=1.0, rate=1.0, prior=prior_theta(SPACE.dim))
    alone = OnlineRegression(SPACE, l2=1.0, rate=1.0, prior=prior_theta(SPACE.dim))
    for start in range(0, len(rewards), batch):
        chunk = rewards[start : start + batch]
        model.learn(batch_of([(twins.tolist(), [1.0] * 3, [])] * len(chunk), chunk))
        alone.learn(batch_of([(one.tolist(), [math.sqrt(3)], [])] * len(chunk), chunk))
        predicted = model.weights[twins].sum()
        assert predicted == pytest.approx(alone.weights[one[0]] * math.sqrt(3))
    assert len(set(model.histories[twins].tolist())) == 1


def test_twins_that_part_are_learned_on_their_own_again():
    """Once one of two twins is seen without the other, their histories differ, and a vector
    with one of them moves its prediction as that feature's own evidence says."""
    a, b = N_DENSE + 11, N_DENSE + 12
    model = OnlineRegression(SPACE, l2=1.0, rate=1.0, prior=prior_theta(SPACE.dim))
    model.learn(batch_of([([a, b], [1.0, 1.0], [])] * 5, [1.0] * 5))
    model.learn(batch_of([([a], [1.0], [])], [0.0]))
    assert model.histories[a] != model.histories[b]
    before = model.weights[a]
    model.learn(batch_of([([a], [1.0], [])], [0.0]))
    # A feature's own diagonal step: the residual over (1 + x^2 / its precision before),
    # then over its precision after (l2 and six sightings before, seven after).
    step = -before / (1.0 + 1.0 / 7.0)
    assert model.weights[a] == pytest.approx(before + step / 8.0)


def test_a_reward_moves_its_prediction_toward_it_and_never_past_it():
    rng = np.random.default_rng(4)
    learner = OnlineRegression(SPACE, l2=1.0, rate=1.0, prior=prior_theta(SPACE.dim))
    for _ in range(200):
        idx = rng.choice(SPACE.dim, size=8, replace=False)
        x = (idx.tolist(), rng.normal(size=8).tolist(), [])
        reward = float(rng.random() < 0.3)
        # Units first: where one grows, the weight shrinks with it (the next test); from
        # where the prediction then stands, the reward moves it.
        learner._grow_scales(idx, np.array(x[1]))
        before = float(learner.weights[idx] @ np.array(x[1]))
        learner.learn(batch_of([x], [reward]))
        after = float(learner.weights[idx] @ np.array(x[1]))
        assert min(before, reward) - 1e-9 <= after <= max(before, reward) + 1e-9


@pytest.mark.parametrize("seed", range(5))
def test_a_value_first_seen_near_zero_does_not_swing_the_predictions(seed):
    """A numeric value's first sighting near 0 sets its unit small, and one reward gives
    it a weight near 1 / (0.01 m); once values of normal size come, that weight shrinks with
    the unit (as VW's normalized update), and predictions stay near the rewards seen. Without
    it they ranged from -19 to +39 after two rewards of 1."""
    rng = np.random.default_rng(seed)
    indices = rng.choice(np.arange(N_DENSE, SPACE.dim), size=4, replace=False).tolist()
    model = OnlineRegression(SPACE, l2=1.0, rate=1.0, prior=prior_theta(SPACE.dim))
    tiny = [1.0, *rng.choice([-0.01, 0.01], 3)]
    model.learn(batch_of([(indices, tiny, [[0, 1, 2, 3]])], [1.0]))
    model.learn(batch_of([(indices, [1.0, 1.0, 1.0, 1.0], [[0, 1, 2, 3]])], [1.0]))
    for _ in range(20):
        z = np.concatenate(([1.0], rng.uniform(-1, 1, 3)))
        assert -0.5 <= float(model.weights[indices] @ z) <= 1.5


def test_projection_keeps_everything_else():
    theta = np.arange(SPACE.dim, dtype=float)
    theta[EXPLICIT_LIKE], theta[INFERRED_INTEREST] = 0.2, 3.0
    out = project(theta, kappa=2.0)
    assert out[EXPLICIT_LIKE] >= 2.0 * out[INFERRED_INTEREST] > 0
    mask = np.ones(SPACE.dim, bool)
    mask[[EXPLICIT_LIKE, INFERRED_INTEREST]] = False
    assert np.array_equal(out[mask], theta[mask])


def test_the_learner_publishes_each_weights_variance():
    """``1 / p_i`` with ``p_i = l2 * min(scale_i, 1)^2 + sum x_i^2`` (scale: the largest
    |x_i|), so a small-valued feature's uncertainty does not depend on its unit; 1 / l2 for a
    feature never seen."""
    rng = np.random.default_rng(5)
    learner = OnlineRegression(SPACE, l2=2.0, rate=1.0, prior=prior_theta(SPACE.dim))
    squares, scales = np.zeros(SPACE.dim), np.zeros(SPACE.dim)
    for _ in range(30):
        idx = rng.choice(SPACE.dim, size=6, replace=False)
        vals = rng.normal(size=6) * rng.choice([1e-3, 1.0, 1e3])  # any unit
        learner.learn(batch_of([(idx.tolist(), vals.tolist(), [])], [float(rng.random())]))
        np.add.at(squares, idx, vals * vals)
        np.maximum.at(scales, idx, np.abs(vals))
    precision = np.where(scales > 0, 2.0 * np.clip(scales, 1e-6, 1.0) ** 2, 2.0) + squares
    expected = 1.0 / precision
    expected[[EXPLICIT_LIKE, INFERRED_INTEREST]] = 0.0
    assert np.allclose(learner.variance(), expected)


def test_a_saved_state_is_taken_up_whole_and_a_foreign_one_refused():
    indices, rewards = block_rewards(6, 20)
    learner = OnlineRegression(SPACE, l2=1.0, rate=1.0, prior=prior_theta(SPACE.dim))
    extra = [(np.arange(5, 12).tolist(), [0.5] * 7, [])]
    for values, reward in rewards:
        learner.learn(batch_of([(indices.tolist(), values, [[0, 1, 2, 3]]), *extra], [reward, 0]))
    restored = OnlineRegression(SPACE, l2=1.0, rate=1.0, prior=prior_theta(SPACE.dim))
    restored.restore(learner.to_bytes())
    assert np.array_equal(restored.weights, learner.weights)
    assert np.array_equal(restored.variance(), learner.variance())
    assert np.array_equal(restored.histories, learner.histories)
    assert restored.updates == learner.updates
    (block,) = restored.blocks.values()
    assert np.array_equal(block.sums, next(iter(learner.blocks.values())).sums)
    other = OnlineRegression(FeatureSpace(10), l2=1.0, rate=1.0, prior=prior_theta(1029))
    for raw in (learner.to_bytes()[:-9], b"not a state", _old_ridge_state()):
        with pytest.raises(StateError):
            other.restore(raw)
        with pytest.raises(StateError):
            restored.restore(raw)
    with pytest.raises(StateError):
        other.restore(learner.to_bytes())  # another layout


def test_a_state_and_a_delta_from_before_twins_are_taken_up_without_twins():
    """A state saved (or a delta handed on) by a learner from before the histories: taken
    up, with each feature its own history, so none is taken for another's twin."""
    learner = OnlineRegression(SPACE, l2=1.0, rate=1.0, prior=prior_theta(SPACE.dim))
    together = np.arange(N_DENSE, N_DENSE + 6)
    learner.learn(batch_of([(together.tolist(), [1.0] * 6, [])] * 3, [1.0, 0.0, 1.0]))
    delta = learner.take_delta()
    data = learner_state.unpack(learner.to_bytes())
    del data["histories"]
    restored = OnlineRegression(SPACE, l2=1.0, rate=1.0, prior=prior_theta(SPACE.dim))
    restored.restore(learner_state.pack(data))
    histories = restored.histories[together]
    assert np.all(histories != 0) and len(set(histories.tolist())) == len(together)
    assert np.array_equal(restored.weights, learner.weights)
    old_delta = learner_state.unpack(delta.to_bytes())
    del old_delta["histories"]
    merged = OnlineRegression(SPACE, l2=1.0, rate=1.0, prior=prior_theta(SPACE.dim))
    merged.merge(Delta.from_bytes(learner_state.pack(old_delta), SPACE.dim))
    assert np.allclose(merged.weights, learner.weights)


def _old_ridge_state() -> bytes:
    """A state as the learner before issue 16 saved it (A^-1 and b): refused, and the
    learner starts again from the prior (``Learner._reload``)."""
    buffer = io.BytesIO()
    np.savez(buffer, a_inv=np.eye(3), b=np.zeros(3), updates=np.array(1))
    return buffer.getvalue()


def test_learners_on_shares_of_the_stream_add_up_through_their_deltas():
    """Two learners from one saved state, each on half the rewards: the state that merges
    both deltas holds every reward's squares, scales and block sums exactly as one learner
    on all of them would, and its weights move by both learners' steps."""
    indices, rewards = block_rewards(8, 40)
    base = OnlineRegression(SPACE, l2=1.0, rate=1.0, prior=prior_theta(SPACE.dim))
    saved = base.to_bytes()
    halves = [OnlineRegression(SPACE, l2=1.0, rate=1.0, prior=prior_theta(SPACE.dim)) for _ in "ab"]
    alone = OnlineRegression(SPACE, l2=1.0, rate=1.0, prior=prior_theta(SPACE.dim))
    for k, (values, reward) in enumerate(rewards):
        batch = batch_of([(indices.tolist(), values, [[0, 1, 2, 3]])], [reward])
        halves[k % 2].learn(batch)
        alone.learn(batch)
    merged = OnlineRegression(SPACE, l2=1.0, rate=1.0, prior=prior_theta(SPACE.dim))
    merged.restore(saved)
    moved = [half.take_delta() for half in halves]
    for delta in moved:
        merged.merge(Delta.from_bytes(delta.to_bytes(), SPACE.dim))
    assert merged.updates == alone.updates == 40
    assert np.allclose(merged.variance(), alone.variance())
    (block,) = merged.blocks.values()
    assert np.allclose(block.sums, next(iter(alone.blocks.values())).sums)
    assert np.allclose(merged.weights, halves[0].weights + halves[1].weights - base.weights)
    # Histories add too: features seen in the same rewards of either half stay twins.
    together = merged.histories[indices]
    assert len(set(together.tolist())) == 1 and together[0] != 0
    # A delta is taken once: the next one holds only what was learned after it.
    assert halves[0].take_delta().updates == 0


def test_a_forgotten_feature_is_as_if_never_seen():
    indices, rewards = block_rewards(9, 10)
    learner = OnlineRegression(SPACE, l2=1.0, rate=1.0, prior=prior_theta(SPACE.dim))
    for values, reward in rewards:
        learner.learn(batch_of([(indices.tolist(), values, [[0, 1, 2, 3]])], [reward]))
    learner.forget(indices[:1])
    assert learner.weights[indices[0]] == 0.0
    assert learner.variance()[indices[0]] == 1.0  # 1 / l2
    assert not learner.blocks  # the block held it
    assert learner.weights[indices[1]] != 0.0  # the others keep what they learned


def random_batch(rng: np.random.Generator, n: int, spread: int) -> object:
    """n vectors of 3 to 9 features among the first ``spread``, a block in every other."""
    vectors = []
    for k in range(n):
        size = int(rng.integers(3, 10))
        indices = rng.choice(np.arange(N_DENSE, N_DENSE + spread), size=size, replace=False)
        blocks = [[0, 1, 2]] if k % 2 else []
        vectors.append((indices.tolist(), rng.uniform(-2, 2, size).tolist(), blocks))
    return batch_of(vectors, rng.random(n).tolist())


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1), st.lists(st.sampled_from(["learn", "merge", "forget"])))
def test_the_published_variance_is_always_the_precision_remade_whole(seed, steps):
    """The variance is kept between publishes and remade only where a precision changed:
    after any learning, merging and forgetting it is what remaking it whole gives."""
    rng = np.random.default_rng(seed)
    model = OnlineRegression(SPACE, l2=1.0, rate=1.0, prior=prior_theta(SPACE.dim))
    other = OnlineRegression(SPACE, l2=1.0, rate=1.0, prior=prior_theta(SPACE.dim))
    for step in steps:
        model.variance()  # a publish in between: what it kept must not go stale
        if step == "learn":
            model.learn(random_batch(rng, int(rng.integers(1, 40)), 60))
        elif step == "merge":
            other.learn(random_batch(rng, 5, 60))
            model.merge(other.take_delta())
        else:
            model.forget(rng.choice(np.arange(N_DENSE, N_DENSE + 60), size=3))
    whole = OnlineRegression(SPACE, l2=1.0, rate=1.0, prior=prior_theta(SPACE.dim))
    whole.restore(model.to_bytes())
    assert np.array_equal(model.variance(), whole.variance())


@pytest.mark.parametrize("width", [4, 16, 17, 64, 129])
def test_a_wide_blocks_prior_grows_with_its_width(width):
    """Up to ``PRIOR_WIDTH`` values a block's prior is l2 in each feature's unit; past it,
    that many times stronger as the block is wider, so a new vector's leverage (how far its
    first reward moves the fit) does not grow with the number of values."""
    block = regression.Block(np.arange(N_DENSE, N_DENSE + width, dtype=np.int64))
    scales = np.zeros(SPACE.dim)
    scales[block.indices] = 0.5
    inverse = block.inverted(2.0, scales)
    strength = 2.0 * max(1.0, width / regression.PRIOR_WIDTH)
    assert np.allclose(inverse, np.eye(width) / (strength * 0.25))


def test_a_large_batch_learns_as_a_small_one_would(monkeypatch):
    """A batch large enough to sum its pulls over the whole space moves the weights as
    summing them over its distinct features does."""
    batch = random_batch(np.random.default_rng(11), 200, SPACE.dim - N_DENSE)
    models = []
    for share in (1, 0):  # dense, then never dense
        monkeypatch.setattr(regression, "DENSE_SHARE", share)
        model = OnlineRegression(SPACE, l2=1.0, rate=1.0, prior=prior_theta(SPACE.dim))
        model.learn(batch)
        models.append(model)
    assert np.allclose(models[0].weights, models[1].weights, rtol=1e-12, atol=1e-15)


# --- change detection ---------------------------------------------------------------------


def one_unit(seed: int) -> tuple[list[int], np.random.Generator]:
    """One numeric block as a unit: its own feature (1 in every vector) and 3 numbers."""
    rng = np.random.default_rng(seed)
    return rng.choice(np.arange(N_DENSE, SPACE.dim), size=4, replace=False).tolist(), rng


def click_rewards(
    model: OnlineRegression,
    unit: list[int],
    rng: np.random.Generator,
    rounds: int,
    chance: Callable[[np.ndarray], float],
    batch: int = 1,
) -> list[float]:
    """``rounds`` 0/1 rewards of the unit at ``chance(values)`` learned ``batch`` at a
    time; the absolute error of the model's prediction before each."""
    errors, vectors, rewards = [], [], []
    for _ in range(rounds):
        values = np.concatenate([[1.0], rng.uniform(-1, 1, 3)])
        errors.append(abs(float(model.weights[unit] @ values) - chance(values)))
        vectors.append((unit, values.tolist(), [[0, 1, 2, 3]]))
        rewards.append(float(rng.random() < chance(values)))
        if len(vectors) == batch:
            model.learn(batch_of(vectors, rewards))
            vectors, rewards = [], []
    return errors


@given(
    st.floats(-5, 5),
    st.lists(st.floats(-5, 5), max_size=60),
    st.sampled_from([changes.DRIFT_RATE, changes.NOISE_RATE, 0.5]),
)
def test_the_moving_mean_of_a_batch_is_the_one_at_a_time_mean(start, values, rate):
    mean = start
    for value in values:
        mean = (1 - rate) * mean + rate * value
    assert math.isclose(changes.moving_mean(start, np.array(values), rate), mean, abs_tol=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_unit_whose_rewards_changed_is_found_and_relearned_at_once(seed):
    """A unit that paid 9 times in 10 for 600 sightings and then 1 in 10: the change is
    found within a few sightings, and the unit's prediction is right again within 100,
    where a learner that never looks stays far off: 600 sightings of the old rewards
    outweigh 100 of the new."""
    unit, rng = one_unit(seed)
    watching = OnlineRegression(
        SPACE, l2=1.0, rate=1.0, prior=prior_theta(SPACE.dim), drift_threshold=4.0
    )
    blind = OnlineRegression(SPACE, l2=1.0, rate=1.0, prior=prior_theta(SPACE.dim))
    after = {}
    for name, model in (("watching", watching), ("blind", blind)):
        rng = np.random.default_rng(seed)
        click_rewards(model, unit, rng, 600, lambda _: 0.9)
        assert model.changes_detected == 0
        counted = model.updates
        errors = click_rewards(model, unit, rng, 100, lambda _: 0.1)
        after[name] = np.mean(errors[-20:])
        if name == "watching":
            assert model.changes_detected == 1
            # The evidence it let go no longer narrows exploration.
            assert model.updates < counted
    assert after["watching"] < 0.1 < 0.3 < after["blind"]


@pytest.mark.parametrize("chance", [0.05, 0.2, 0.5])
@pytest.mark.parametrize("batch", [1, 20])
def test_steady_click_rewards_are_not_taken_for_a_change(chance, batch):
    """0/1 rewards are noisy: a unit's residuals run in streaks of one sign by chance. The
    noise of each unit sets how far its mean residual may stray, so 3,000 sightings of
    steady rewards find no change."""
    unit, rng = one_unit(7)
    model = OnlineRegression(
        SPACE, l2=1.0, rate=1.0, prior=prior_theta(SPACE.dim), drift_threshold=4.0
    )
    click_rewards(model, unit, rng, 3000, lambda values: chance * (1 + 0.5 * values[1]), batch)
    assert model.changes_detected == 0
    assert model.updates == 3000


def test_watching_for_changes_does_not_change_what_is_learned_until_one_is_found():
    rng = np.random.default_rng(12)
    batches = [random_batch(rng, 10, 40) for _ in range(30)]
    models = [
        OnlineRegression(SPACE, l2=1.0, rate=1.0, prior=prior_theta(SPACE.dim), drift_threshold=h)
        for h in (0.0, 1e9)
    ]
    for model in models:
        for batch in batches:
            model.learn(batch)
    assert np.array_equal(models[0].weights, models[1].weights)
    assert np.array_equal(models[0].variance(), models[1].variance())


def test_evidence_taken_back_by_one_learner_is_taken_back_in_the_merged_state():
    """A learner that found a change hands on a delta with fewer updates than it learned;
    merged, the shared count goes down by as much, and never below zero."""
    unit, rng = one_unit(3)
    base = OnlineRegression(SPACE, l2=1.0, rate=1.0, prior=prior_theta(SPACE.dim))
    click_rewards(base, unit, rng, 600, lambda _: 0.9)
    saved = base.to_bytes()
    finder = OnlineRegression(
        SPACE, l2=1.0, rate=1.0, prior=prior_theta(SPACE.dim), drift_threshold=4.0
    )
    finder.restore(saved)
    click_rewards(finder, unit, rng, 200, lambda _: 0.9)  # measures the unit's noise
    click_rewards(finder, unit, rng, 50, lambda _: 0.1)
    assert finder.changes_detected == 1
    delta = Delta.from_bytes(finder.take_delta().to_bytes(), SPACE.dim)
    assert delta.updates < 0
    shared = OnlineRegression(SPACE, l2=1.0, rate=1.0, prior=prior_theta(SPACE.dim))
    shared.restore(saved)
    shared.merge(delta)
    assert shared.updates == finder.updates == 600 + delta.updates
    assert np.allclose(shared.weights, finder.weights)
    empty = OnlineRegression(SPACE, l2=1.0, rate=1.0, prior=prior_theta(SPACE.dim))
    empty.merge(delta)
    assert empty.updates == 0
    assert empty.take_delta().updates == 0  # what it merged is not its own to hand on


def greedy_bandit(
    model: OnlineRegression,
    units: list[list[int]],
    rng: np.random.Generator,
    rounds: int,
    pays: Callable[[int, np.ndarray], float],
    batch: int = 10,
) -> list[float]:
    """A bandit over ``units`` (one numeric block each, as ``one_unit``'s) that picks the one
    the model predicts highest, one in 20 at random; each pick pays 1 at ``pays(unit,
    context)`` and carries the explicit like too (1 on one unit in three). The rewards, in
    order."""
    got, vectors, rewards = [], [], []
    for _ in range(rounds):
        context = rng.uniform(-1, 1, 3)
        values = np.concatenate([[1.0], context])
        predicted = [float(model.weights[u] @ values) for u in units]
        k = int(rng.integers(len(units))) if rng.random() < 0.05 else int(np.argmax(predicted))
        liked = float(k % 3 == 0)
        vectors.append(([EXPLICIT_LIKE, *units[k]], [liked, *values], [[1, 2, 3, 4]]))
        rewards.append(float(rng.random() < pays(k, context)))
        got.append(rewards[-1])
        if len(vectors) == batch:
            model.learn(batch_of(vectors, rewards))
            vectors, rewards = [], []
    return got


AUDIENCES = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1]], dtype=float)


def audiences(k: int, context: np.ndarray) -> float:
    """Unit k pays most to the contexts along its own direction (its audience): from 0.02
    to 0.98, 0.5 on average."""
    return float(np.clip(0.5 + 0.9 * AUDIENCES[k] @ context, 0.02, 0.98))


def classes(k: int, context: np.ndarray) -> float:
    """Unit k pays 1 to the contexts nearest its direction (its class), as the drift
    scenario's offers do, and 0 elsewhere."""
    return float(np.argmax(AUDIENCES @ context) == k)


def bandit_units(seed: int) -> tuple[list[list[int]], np.random.Generator]:
    rng = np.random.default_rng(seed)
    spread = rng.choice(np.arange(N_DENSE, SPACE.dim), size=20, replace=False)
    return [spread[k * 4 : k * 4 + 4].tolist() for k in range(5)], rng


@pytest.mark.parametrize("batch", [1, 10])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("pays", [audiences, classes])
def test_a_greedy_policy_learning_steady_rewards_does_not_restart_its_model(pays, seed, batch):
    """A model that picks what it predicts highest predicts its picks too high while it
    learns (it picks them where its errors flatter it): its residuals do not average zero,
    and a test of all of them against zero took that for a change of tastes. Over 4,000
    steady rewards the model never starts again."""
    units, rng = bandit_units(seed)
    model = OnlineRegression(
        SPACE, l2=1.0, rate=1.0, prior=prior_theta(SPACE.dim), drift_threshold=4.0
    )
    got = greedy_bandit(model, units, rng, 4000, pays, batch)
    assert model.restarts == 0
    assert np.mean(got[-1000:]) > 0.55  # it learned the audiences (at random: 0.2 to 0.5)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_when_every_unit_changes_class_the_learner_finds_it_and_relearns(seed):
    """Each unit starts paying for the next unit's class. A unit that loses its class
    unlearns it within a few sightings, often too few for its own watch; then the residuals
    of all of them together fall at once, and the model starts again (from the prior, but
    keeping what a stated like is worth). A learner that does not look stays near 0.1: what
    it learned of 3,000 rewards outweighs the new ones."""
    moved = {}
    for threshold in (4.0, 0.0):
        units, rng = bandit_units(seed)
        model = OnlineRegression(
            SPACE, l2=1.0, rate=1.0, prior=prior_theta(SPACE.dim), drift_threshold=threshold
        )
        greedy_bandit(model, units, rng, 3000, classes)
        like = model.weights[EXPLICIT_LIKE]
        changes_before = model.changes_detected
        got = greedy_bandit(model, units, rng, 1000, lambda k, c: classes((k + 1) % 5, c))
        if threshold:
            assert model.restarts + model.changes_detected - changes_before > 0
            if model.restarts:
                # What a stated like is worth is not forgotten (only the units' rewards
                # changed): its weight moved by the 1,000 new rewards only.
                assert model.weights[EXPLICIT_LIKE] == pytest.approx(like, abs=0.1)
        moved[threshold] = np.mean(got)
    assert moved[0.0] < 0.15
    assert moved[4.0] > 0.35


def test_the_model_watch_sees_a_fall_that_holds_and_nothing_else():
    """The whole model's watch (``changes.ModelWatch``), on residuals as a learned model
    has them: mostly small, a miss (-0.9) one time in 16. A fall that holds is found once
    it has held ``MODEL_CONFIRM_REWARDS`` rewards; a burst of ten misses in a row, the
    residuals of a model learning fast (their mean rising towards zero), and anything
    before the model has learned ``MODEL_WATCH_AFTER`` rewards are not."""
    rng = np.random.default_rng(4)

    def residuals(n: int, miss: float = 1 / 16) -> np.ndarray:
        return np.where(rng.random(n) < miss, -0.9, rng.normal(0.05, 0.05, n))

    def first_alarm(watch: changes.ModelWatch, stream: np.ndarray, learned: int) -> int | None:
        for k, residual in enumerate(stream):
            threshold = changes.MODEL_THRESHOLD_FACTOR * 4.0  # the default's
            if watch.changed(np.array([residual]), learned + k, threshold, 0.05):
                return k
        return None

    steady = residuals(3000)
    watch = changes.ModelWatch()
    assert first_alarm(watch, steady, 0) is None
    fallen = residuals(200, miss=0.6)  # the picks miss six times in ten now
    found = first_alarm(watch, fallen, 3000)
    assert found is not None and changes.MODEL_CONFIRM_REWARDS <= found < 80
    for disturbance in (
        np.full(10, -0.9),  # a burst of misses, then steady again
        np.linspace(-0.2, 0.0, 400) + rng.normal(0, 0.05, 400),  # learning fast
    ):
        watch = changes.ModelWatch()
        first_alarm(watch, steady, 0)
        assert first_alarm(watch, np.concatenate([disturbance, residuals(300)]), 3000) is None
    young = changes.ModelWatch()
    assert first_alarm(young, np.concatenate([steady[:300], fallen]), 0) is None


def test_a_restart_found_by_one_learner_restarts_the_merged_state():
    """Learners share the stream: the one that finds the change hands on a delta that takes
    the shared state back to the prior too (and its evidence count to zero). (A world
    where the restart, not the units' own watches, finds the change.)"""
    units, rng = bandit_units(3)
    base = OnlineRegression(SPACE, l2=1.0, rate=1.0, prior=prior_theta(SPACE.dim))
    greedy_bandit(base, units, rng, 2500, classes, batch=10)
    saved = base.to_bytes()
    finder = OnlineRegression(
        SPACE, l2=1.0, rate=1.0, prior=prior_theta(SPACE.dim), drift_threshold=4.0
    )
    finder.restore(saved)
    greedy_bandit(finder, units, rng, 500, classes, batch=10)  # measures the residuals' noise
    finder.take_delta()  # the other learner has merged this much already
    shared = OnlineRegression(SPACE, l2=1.0, rate=1.0, prior=prior_theta(SPACE.dim))
    shared.restore(finder.to_bytes())
    greedy_bandit(finder, units, rng, 300, lambda k, c: classes((k + 1) % 5, c), batch=10)
    assert finder.restarts == 1
    shared.merge(Delta.from_bytes(finder.take_delta().to_bytes(), SPACE.dim))
    assert shared.updates == finder.updates < 300
    assert np.allclose(shared.weights, finder.weights)
    assert np.allclose(shared.variance(), finder.variance())


def test_the_bonus_is_the_spread_of_each_vector_times_the_setting():
    ctx = RequestContext("web", "home", 14, (("device", "mobile"),), (("cart", 42.0),))
    offers = [Offer(f"o{i}", "t", ("running", f"t{i}"), ("web",), i / 10) for i in range(5)]
    batch = SPACE.featurize_many(ctx, offers, [True, False] * 2 + [True], [0.3] * 5, 2)
    rng = np.random.default_rng(9)
    theta, variance = rng.normal(size=SPACE.dim), rng.random(SPACE.dim)
    model = LinearModel("v", theta, SPACE.layout, 10, variance)
    predicted = batch.dot(theta)
    spread = np.array(
        [
            math.sqrt(sum(v * v * variance[i] for i, v in zip(x.indices, x.values, strict=True)))
            for x in (batch.vector(k) for k in range(len(batch)))
        ]
    )
    assert np.allclose(batch.spread(variance), spread)
    assert np.allclose(model.scores(batch, 0.5), predicted + 0.5 * spread)
    assert np.array_equal(model.scores(batch, 0.0), predicted)  # 0 disables it
    no_variance = LinearModel("v", theta, SPACE.layout, 10)  # the prior, an old snapshot
    assert np.array_equal(no_variance.scores(batch, 0.5), predicted)


def old_snapshot(theta: np.ndarray, **extra: object) -> bytes:
    """A snapshot as servers published them before the variance existed (``extra``: more
    header fields)."""
    buffer = io.BytesIO()
    header = json.dumps({"version": "ridge-1", "layout": SPACE.layout, "updates": 3, **extra})
    buffer.write(len(header).to_bytes(4, "big") + header.encode())
    np.save(buffer, theta, allow_pickle=False)
    return buffer.getvalue()


def test_a_snapshot_carries_the_variance_and_an_old_one_still_loads():
    theta = prior_theta(SPACE.dim)
    variance = np.linspace(0.0, 2.0, SPACE.dim)
    loaded = LinearModel.from_bytes(
        LinearModel("ridge-2", theta, SPACE.layout, 7, variance).to_bytes(), SPACE
    )
    assert loaded.variance is not None and loaded.updates == 7
    expected = variance.astype(np.float32).astype(np.float64)  # stored as float32
    expected[[EXPLICIT_LIKE, INFERRED_INTEREST]] = 0.0  # whatever the writer sent
    assert np.array_equal(loaded.variance, expected)
    old = LinearModel.from_bytes(old_snapshot(theta), SPACE)
    assert old.variance is None and old.version == "ridge-1" and old.updates == 3
    assert np.array_equal(old.theta, theta)


def dense_snapshot(theta: np.ndarray, variance: np.ndarray | None, **extra: object) -> bytes:
    """A snapshot as servers published them before issue 16 (format 1): dense float64."""
    raw = old_snapshot(theta, variance=variance is not None, **extra)
    if variance is None:
        return raw
    buffer = io.BytesIO()
    np.save(buffer, variance, allow_pickle=False)
    return raw + buffer.getvalue()


def test_a_snapshot_of_the_dense_float64_format_still_loads():
    """Snapshots kept in Redis from before the compact format are served as they were."""
    rng = np.random.default_rng(4)
    theta, variance = rng.normal(size=SPACE.dim), rng.random(SPACE.dim)
    loaded = LinearModel.from_bytes(dense_snapshot(theta, variance), SPACE)
    assert np.array_equal(loaded.theta, theta) and loaded.updates == 3
    assert loaded.variance is not None
    assert np.array_equal(loaded.variance, evidence_free(variance))


def touched_model(space: FeatureSpace, touched: int, seed: int = 6) -> LinearModel:
    """A model as a learner with l2 = 2 publishes it after ``touched`` features were seen."""
    rng = np.random.default_rng(seed)
    theta, variance = prior_theta(space.dim), np.full(space.dim, 0.5)
    at = rng.choice(space.dim, size=touched, replace=False)
    theta[at] = rng.normal(size=touched)
    variance[at] = 1.0 / (2.0 + rng.random(touched) * 50)
    return LinearModel("ridge-5", theta, space.layout, 11, evidence_free(variance))


@pytest.mark.parametrize("touched", [0, 30, 200, SPACE.dim], ids=lambda t: f"touched-{t}")
def test_a_snapshot_stores_float32_values_where_the_model_moved(touched):
    model = touched_model(SPACE, touched)
    raw = model.to_bytes()
    loaded = LinearModel.from_bytes(raw, SPACE)
    assert loaded.theta.dtype == np.float64 and loaded.theta.shape == (SPACE.dim,)
    assert np.array_equal(loaded.theta, model.theta.astype(np.float32))
    assert loaded.variance is not None and model.variance is not None
    assert np.array_equal(loaded.variance, model.variance.astype(np.float32))
    assert (loaded.version, loaded.layout, loaded.updates) == ("ridge-5", SPACE.layout, 11)
    untouched = model.variance == 0.5
    assert np.all(loaded.variance[untouched] == 0.5)  # the fill is kept exactly
    # Positions and float32 values (two of them), never more than dense float32 plus a bitmap.
    stored = touched + 3  # the prior's weights differ from 0 too
    assert len(raw) < 300 + min(stored * 12, SPACE.dim * 8 + SPACE.dim // 8)
    without = LinearModel.from_bytes(dataclasses.replace(model, variance=None).to_bytes(), SPACE)
    assert without.variance is None and np.array_equal(without.theta, loaded.theta)


def test_a_compact_snapshot_of_the_default_space_is_a_few_megabytes():
    space = FeatureSpace(18)
    raw = touched_model(space, space.dim).to_bytes()
    assert len(raw) < 2.2e6  # 2^18 float32 twice and a bitmap; 4.2 MB dense float64
    assert LinearModel.from_bytes(raw, space).theta.shape == (space.dim,)


def compact_snapshot(edit: Callable[[dict, bytes], tuple[dict, bytes]]) -> bytes:
    """A format 2 snapshot whose header and body ``edit`` changes."""
    raw = touched_model(SPACE, 5).to_bytes()  # few enough for a list of positions
    size = int.from_bytes(raw[:4], "big")
    header, body = edit(json.loads(raw[4 : 4 + size]), raw[4 + size :])
    encoded = json.dumps(header).encode()
    return len(encoded).to_bytes(4, "big") + encoded + body


def _bitmap(header: dict, body: bytes) -> tuple[dict, bytes]:
    count = header["count"]
    at = np.frombuffer(body[: count * 4], "<i4")
    bits = np.zeros(SPACE.dim, bool)
    bits[at] = True
    return {**header, "positions": "bitmap"}, np.packbits(bits).tobytes() + body[count * 4 :]


def _padded_bitmap(header: dict, body: bytes) -> tuple[dict, bytes]:
    header, body = _bitmap(header, body)
    last = (SPACE.dim + 7) // 8 - 1  # its low bits are past the last weight (dim % 8 != 0)
    return header, body[:last] + bytes([body[last] | 1]) + body[last + 1 :]


def _bitmap_short_of_its_count(header: dict, body: bytes) -> tuple[dict, bytes]:
    header, body = _bitmap(header, body)
    return {**header, "count": header["count"] + 1}, body + bytes(8)


def _swap_positions(header: dict, body: bytes) -> tuple[dict, bytes]:
    at = np.frombuffer(body[:8], "<i4")
    return header, at[::-1].tobytes() + body[8:]


def _position(value: int) -> Callable[[dict, bytes], tuple[dict, bytes]]:
    return lambda header, body: (header, np.array([value], "<i4").tobytes() + body[4:])


def _value(offset: int, value: float) -> Callable[[dict, bytes], tuple[dict, bytes]]:
    def edit(header: dict, body: bytes) -> tuple[dict, bytes]:
        at = header["count"] * 4 + offset * header["count"] * 4
        return header, body[:at] + np.array([value], "<f4").tobytes() + body[at + 4 :]

    return edit


def bad_variance_snapshots() -> list[bytes]:
    theta = prior_theta(SPACE.dim)
    good = np.full(SPACE.dim, 0.5)
    out = []
    for variance in (
        np.full(7, 0.5),  # wrong size
        np.full((SPACE.dim, 2), 0.5),  # wrong shape
        good.astype(np.float32),  # wrong dtype
        np.where(np.arange(SPACE.dim) == 9, np.nan, good),
        np.where(np.arange(SPACE.dim) == 9, np.inf, good),
        np.where(np.arange(SPACE.dim) == 9, -1e-3, good),  # a variance is never negative
    ):
        out.append(dense_snapshot(theta, variance))
    # The header promises a variance the snapshot does not hold.
    promised = dense_snapshot(theta, good)
    out.append(old_snapshot(theta, variance=True))
    out.append(promised[: len(promised) - 40])  # cut short
    header = len(promised) - (SPACE.dim * 8 + 128) * 2 + 10  # in theta's .npy header
    out.append(promised[:header] + bytes([promised[header] ^ 1]) + promised[header + 1 :])
    out.append(promised.replace(b"(517,)", b"(517999999999999,)", 1))  # more than any RAM
    for variance in (  # the compact format carries no dtype or shape, but values
        np.where(np.arange(SPACE.dim) == 9, np.nan, good),
        np.where(np.arange(SPACE.dim) == 9, np.inf, good),
        np.where(np.arange(SPACE.dim) == 9, -1e-3, good),
        np.full(SPACE.dim, -0.5),  # the fill itself
    ):
        out.append(LinearModel("ridge-v", theta, SPACE.layout, 1, variance).to_bytes())
    return out


def corrupt_compact_snapshots() -> list[bytes]:
    good = touched_model(SPACE, 5).to_bytes()
    assert SPACE.dim % 8 and json.loads(good[4 : 4 + good[3]])["positions"] == "list"
    edits: list[Callable[[dict, bytes], tuple[dict, bytes]]] = [
        lambda h, b: (h, b[:-1]),  # cut short
        lambda h, b: (h, b + b"\0"),  # a byte too many
        lambda h, b: ({**h, "format": 3}, b),  # a format this server does not know
        lambda h, b: ({**h, "format": "2"}, b),
        lambda h, b: ({**h, "dim": SPACE.dim * 2}, b),  # another space
        lambda h, b: ({**h, "dim": 2**60}, b),
        lambda h, b: ({**h, "dim": float(SPACE.dim)}, b),
        lambda h, b: ({**h, "count": -1}, b),
        lambda h, b: ({**h, "count": SPACE.dim + 1}, b),
        lambda h, b: ({**h, "count": True}, b),
        lambda h, b: ({**h, "positions": "ranges"}, b),
        lambda h, b: ({**h, "variance": 1}, b),
        lambda h, b: ({**h, "variance": False}, b),  # the body still holds it
        lambda h, b: ({**h, "variance_fill": "0.5"}, b),
        lambda h, b: ({**h, "variance_fill": None}, b),
        lambda h, b: ({**h, "variance_fill": math.nan}, b),
        lambda h, b: ({k: v for k, v in h.items() if k != "count"}, b),
        lambda h, b: ({k: v for k, v in h.items() if k != "version"}, b),
        _swap_positions,  # positions out of order
        _position(-1),
        _position(SPACE.dim),
        _value(0, math.inf),  # a weight
        _value(0, math.nan),
        _value(1, -1.0),  # a variance
        _padded_bitmap,  # a bit set past the last weight
        _bitmap_short_of_its_count,
    ]
    out = [compact_snapshot(edit) for edit in edits]
    out += [good[:3], good[:40], b"\xff\xff\xff\xff" + good[4:], b"\0\0\0\2[]" + good[6:]]
    out.append(b"\0\x01\x86\xa0" + b"[" * 100_000)  # a header nested too deep to parse
    return out


@pytest.mark.parametrize("raw", bad_variance_snapshots())
def test_a_snapshot_with_an_unusable_variance_is_refused(raw):
    with pytest.raises(SnapshotError):
        LinearModel.from_bytes(raw, SPACE)


@pytest.mark.parametrize("raw", corrupt_compact_snapshots())
def test_a_corrupt_compact_snapshot_is_refused(raw):
    with pytest.raises(SnapshotError):
        LinearModel.from_bytes(raw, SPACE)


def test_the_bitmap_edit_above_makes_a_snapshot_that_loads():
    """The corrupt bitmaps above are cut from this valid one."""
    loaded = LinearModel.from_bytes(compact_snapshot(_bitmap), SPACE)
    assert np.array_equal(
        loaded.theta, LinearModel.from_bytes(compact_snapshot(lambda h, b: (h, b)), SPACE).theta
    )


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_a_mangled_snapshot_loads_or_raises_snapshot_error(data):
    """Whatever happened to the bytes on the way, loading them gives a model or a
    SnapshotError: a server logs it and keeps its model, it never fails otherwise."""
    base = data.draw(
        st.sampled_from(
            [
                touched_model(SPACE, 20).to_bytes(),
                touched_model(SPACE, SPACE.dim).to_bytes(),
                dense_snapshot(prior_theta(SPACE.dim), np.full(SPACE.dim, 0.5)),
            ]
        )
    )
    raw = bytearray(base)
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        at = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if action == "flip" and raw:
            raw[at] ^= data.draw(st.integers(1, 255))
        elif action == "cut":
            del raw[at : at + data.draw(st.integers(1, 64))]
        else:
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=16))
    try:
        model = LinearModel.from_bytes(bytes(raw), SPACE)
    except SnapshotError:
        return
    assert model.theta.shape == (SPACE.dim,) and np.all(np.isfinite(model.theta))
    assert model.variance is None or np.all(model.variance >= 0)


# --- exploration --------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.floats(0, 0.2, allow_nan=False), min_size=2, max_size=1000),
    st.floats(0, 1e4),
    st.floats(0.01, 0.5),
)
@example([1e-310, 0.0], 50.0, 0.1)  # a subnormal gap once made gamma infinite
def test_a_slot_explores_at_most_about_the_share(predicted, gamma, share):
    """Click-rate gaps or a thousand offers: gamma is raised so that the probability of an
    exploration pick stays near the share (never far above it), and never lowered."""
    scores = np.array(predicted)
    best = int(scores.argmax())
    raised = gamma_for_share(scores, best, gamma, share)
    assert raised >= gamma
    probs = igw_probabilities(scores, raised)
    assert np.isfinite(raised) and np.isfinite(probs).all()
    explore = float(probs[scores < scores[best]].sum())
    # Unless gamma could not be raised: gaps at the edge of float precision are ties.
    assert explore <= share * 1.01 + 1e-9 or raised in (gamma, MAX_GAMMA)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-1, 1, allow_nan=False), min_size=2, max_size=30),
    st.integers(1, 4),
    st.integers(0, 2**32),
)
def test_a_slate_with_a_share_still_has_exact_propensities(predicted, slots, seed):
    """The propensity of each pick is its probability at its slot, whatever gamma the share
    made the slate use: the IGW probability at that gamma over the offers left."""
    scores = np.array(predicted)
    picks = pick_slate(scores, slots, 50.0, np.random.default_rng(seed), share=0.1)
    gamma = gamma_for_share(scores, int(scores.argmax()), 50.0, 0.1)  # once for the slate
    remaining = list(range(len(scores)))
    for pick in picks:
        probs = igw_probabilities(scores[remaining], gamma)
        assert pick.propensity == pytest.approx(probs[remaining.index(pick.index)])
        remaining.remove(pick.index)


def test_with_a_memory_the_model_keeps_up_with_changed_tastes():
    """A feature rewarded 1 for 400 sightings, then 0: with a memory of 50 sightings its
    evidence stops growing near 50 and the prediction follows the change within a few dozen
    rewards; remembering everything, it is still far from 0."""
    learners = {
        memory: OnlineRegression(
            SPACE, l2=1.0, rate=1.0, prior=prior_theta(SPACE.dim), memory=memory
        )
        for memory in (50.0, math.inf)
    }
    x = ([7, 8], [1.0, 1.0], [])
    for reward in [1.0] * 400 + [0.0] * 60:
        for learner in learners.values():
            learner.learn(batch_of([x], [reward]))
    assert learners[50.0].squares[7] <= 50.0 + 1e-9
    after = {m: float(learner.weights[[7, 8]].sum()) for m, learner in learners.items()}
    assert after[50.0] < 0.35 < after[math.inf]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-10, 10, allow_nan=False), min_size=1, max_size=50),
    st.floats(0, 1e4),
)
def test_igw_probabilities_are_a_distribution(predicted, gamma):
    probs = igw_probabilities(np.array(predicted), gamma)
    assert math.isclose(probs.sum(), 1.0, rel_tol=1e-9)
    assert (probs > 0).all()
    assert probs[int(np.argmax(predicted))] >= probs.max() - 1e-12


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=50).filter(any),
    st.integers(0, 2**63),
)
def test_draw_is_what_choice_would_draw(weights, seed):
    """The request path draws without Generator.choice's checks; the same generator state
    must give the same index as choice would (same slates for the same seeds)."""
    probs = np.array(weights) / sum(weights)
    ours, theirs = np.random.default_rng(seed), np.random.default_rng(seed)
    for _ in range(5):
        assert draw(probs, ours) == int(theirs.choice(len(probs), p=probs))


def chi_square(observed: np.ndarray, expected: np.ndarray) -> float:
    return float(((observed - expected) ** 2 / expected).sum())


# Upper 0.1% points of the chi-square distribution, by degrees of freedom.
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}


def test_slot_frequencies_match_propensities_seeded():
    predicted = np.array([0.9, 0.5, 0.45, 0.1, 0.0])
    probs = igw_probabilities(predicted, gamma=10.0)
    rng = np.random.default_rng(2026)
    n = 20_000
    counts = np.bincount(
        [pick_slate(predicted, 1, 10.0, rng)[0].index for _ in range(n)], minlength=5
    )
    assert chi_square(counts, probs * n) < CHI2_999[4]


@pytest.mark.parametrize("variance", [False, True], ids=["prior", "with-bonus"])
def test_served_propensities_match_observed_choices(catalog, decisioning, models, variance):
    """Through the real server: the first slot's choice over many decisions follows the
    propensities the responses report; with a model that carries variances too, whose
    bonus (TACTFUL_EXPLORATION_BONUS, on by default) reorders the offers."""
    for i, priority in enumerate([0.9, 0.88, 0.85, 0.8]):
        catalog.PutOffer(catalog_pb2.PutOfferRequest(offer=offer(f"o{i}", priority=priority)))
    if variance:
        spread = np.random.default_rng(11).random(SERVED.dim) * 0.05
        models.publish(
            lambda v: LinearModel(
                f"ridge-{v}", prior_theta(SERVED.dim), SERVED.layout, 1, spread
            ).to_bytes(),
            keep=2,
            now=time.time(),
        )
        assert decide_with_model(decisioning, "ridge-1").model_version == "ridge-1"
    n = 1500
    counts: dict[str, int] = {}
    reported: dict[str, float] = {}
    for i in range(n):
        response = decisioning.Decide(
            d.DecideRequest(user_id="same-user", channel="web", dry_run=True, request_id=f"r{i}")
        )
        (choice,) = response.choices
        counts[choice.offer_id] = counts.get(choice.offer_id, 0) + 1
        reported.setdefault(choice.offer_id, choice.propensity)
        assert reported[choice.offer_id] == pytest.approx(choice.propensity)
    assert sum(reported.values()) == pytest.approx(1.0)  # every offer was seen: all of p
    ids = sorted(reported)
    observed = np.array([counts[i] for i in ids], dtype=float)
    expected = np.array([reported[i] for i in ids]) * n
    assert chi_square(observed, expected) < CHI2_999[len(ids) - 1]
    assert response.model_version == ("ridge-1" if variance else "prior")


# --- the loop -------------------------------------------------------------------------------


def report(decisioning, decision_id, offer_id, event, outcome_id):
    return decisioning.ReportOutcome(
        d.ReportOutcomeRequest(
            decision_id=decision_id, offer_id=offer_id, event=event, outcome_id=outcome_id
        )
    )


@pytest.mark.both_stores
def test_learning_moves_choices_toward_rewarded_offers(catalog, decisioning, models):
    for name in ("good", "meh", "bad"):
        catalog.PutOffer(catalog_pb2.PutOfferRequest(offer=offer(name, ("misc",), priority=0.5)))
    learner = new_learner(models)
    learner.start()
    shown = []
    for i in range(120):
        response = decisioning.Decide(d.DecideRequest(user_id=f"u{i % 7}", channel="web"))
        (choice,) = response.choices
        shown.append(choice.offer_id)
        event = d.OUTCOME_EVENT_CLICK if choice.offer_id == "good" else d.OUTCOME_EVENT_DISMISS
        report(decisioning, response.decision_id, choice.offer_id, event, f"o{i}")
        learner.step(block_ms=0)
        if learner.published_version is not None:  # the next Decide decides with it
            published = f"ridge-{learner.published_version}"
            assert decide_with_model(decisioning, published).model_version == published
    learner.stop()
    late = shown[-40:]
    assert late.count("good") > 0.7 * len(late), late
    final = decisioning.Decide(d.DecideRequest(user_id="new-user", channel="web", slots=3))
    assert final.choices[0].offer_id == "good"  # a new user starts from it too
    assert final.model_version.startswith("ridge-")


def test_outcome_reaches_every_server_quickly(redis_proc, store, settings, catalog, models):
    """Two servers on one Redis: an outcome reported through one changes the model version
    the other decides with, within the 250 ms target (measured here, not asserted tightly)."""
    catalog.PutOffer(catalog_pb2.PutOfferRequest(offer=offer("a", priority=0.5)))
    other_store = make_store(redis_url(redis_proc), settings)
    other = build_server(settings, other_store, port=0)
    first = build_server(settings, store, port=0)
    learner = new_learner(models)
    learner.start()
    try:
        with (
            grpc.insecure_channel(f"127.0.0.1:{first.port}") as ch1,
            grpc.insecure_channel(f"127.0.0.1:{other.port}") as ch2,
        ):
            one, two = (decisioning_pb2_grpc.DecisioningStub(c) for c in (ch1, ch2))
            before = two.Decide(d.DecideRequest(user_id="u", channel="web", dry_run=True))
            response = one.Decide(d.DecideRequest(user_id="u", channel="web"))
            start = time.perf_counter()
            report(one, response.decision_id, "a", d.OUTCOME_EVENT_CLICK, "o1")
            learner.step(block_ms=50)
            # The first Decide to see the version has the other server load it meanwhile.
            after = decide_with_model(two, f"ridge-{learner.published_version}", user_id="u")
            elapsed = time.perf_counter() - start
    finally:
        first.stop(None)
        other.stop(None)
        other_store.client.close()
    assert before.model_version == "prior"
    assert after.model_version == f"ridge-{learner.published_version}"
    assert after.choices[0].score > before.choices[0].score  # the click raised it
    assert elapsed < 5.0  # generous: the closing note reports the measured delay
    print(f"outcome to model on another server: {elapsed * 1000:.1f} ms")


@pytest.mark.both_stores
def test_no_outcome_in_the_window_is_learned_as_reward_zero(catalog, decisioning, models):
    catalog.PutOffer(catalog_pb2.PutOfferRequest(offer=offer("a", priority=0.5)))
    response = decisioning.Decide(d.DecideRequest(user_id="u", channel="web"))
    learner = new_learner(models)
    learner.start()
    learner.clock = lambda: time.time() + 3600  # the 10-minute window is long over
    learner.step(block_ms=0)  # closes the window: a reward-0 entry goes on the stream
    learner.step(block_ms=0)  # and is applied
    assert learner.regression.updates == 1
    # A late outcome is stored, but the offer was already learned: it counts once.
    report(decisioning, response.decision_id, "a", d.OUTCOME_EVENT_CLICK, "late")
    learner.step(block_ms=0)
    assert learner.regression.updates == 1


@pytest.mark.both_stores
def test_learner_crash_loses_nothing_and_applies_each_reward_once(
    store, catalog, decisioning, models
):
    catalog.PutOffer(catalog_pb2.PutOfferRequest(offer=offer("a", priority=0.5)))
    decisions = [
        decisioning.Decide(d.DecideRequest(user_id=f"u{i}", channel="web")) for i in range(30)
    ]
    for i, response in enumerate(decisions[:20]):
        report(decisioning, response.decision_id, "a", d.OUTCOME_EVENT_CLICK, f"o{i}")

    first = new_learner(models, checkpoint_interval_seconds=3600)
    first.start()
    first.step(block_ms=0)  # reads and applies 20 ...
    first.checkpoint(force=True)  # ... and saves them
    for i, response in enumerate(decisions[20:], start=20):
        report(decisioning, response.decision_id, "a", d.OUTCOME_EVENT_CLICK, f"o{i}")
    first.step(block_ms=0)  # applies 10 more but dies before saving: no checkpoint, no XACK
    assert first.regression.updates == 30
    del first

    second = new_learner(models)
    second.consumer = "another-host"  # a new process: XAUTOCLAIM takes over the dead one's
    second.claim_idle_ms = 0  # (their 10 s of idleness, skipped)
    second.start()
    second.step(block_ms=0)
    assert second.regression.updates == 30  # 20 from the checkpoint + 10 re-claimed, none twice
    reference = new_learner(models)  # the same 30 rewards applied once each, in the same reads
    entries = [
        (f"{i}-0", {"x": rec["x"], "r": "1.0"})
        for i, rec in enumerate(_stream_fields(store, decisions), start=1)
    ]
    reference._apply(entries[:20])
    reference._apply(entries[20:])
    assert np.allclose(second.theta(), reference.theta())
    second.stop()
    assert store.client.xpending(keys.OUTCOME_STREAM, keys.LEARNER_GROUP)["pending"] == 0


@pytest.mark.both_stores
def test_an_outcome_retried_after_a_failed_send_reaches_the_learner_once(
    store, catalog, decisioning, monkeypatch
):
    """An outcome is stored in the decision's slot, then its reward sent in the stream's: if
    the second step fails, the client's retry (same outcome_id) sends it, and only once."""
    catalog.PutOffer(catalog_pb2.PutOfferRequest(offer=offer("a", priority=0.5)))
    shown = decisioning.Decide(d.DecideRequest(user_id="u", channel="web"))
    send = store._send_reward

    def lost(**kwargs):
        raise ConnectionError("the stream's node went away")

    monkeypatch.setattr(store, "_send_reward", lost)
    with pytest.raises(grpc.RpcError) as failed:
        report(decisioning, shown.decision_id, "a", d.OUTCOME_EVENT_CLICK, "o1")
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert store.client.xlen(keys.OUTCOME_STREAM) == 0
    monkeypatch.setattr(store, "_send_reward", send)
    for _ in range(2):  # the retry, and one more
        report(decisioning, shown.decision_id, "a", d.OUTCOME_EVENT_CLICK, "o1")
    (entry,) = store.client.xrange(keys.OUTCOME_STREAM)
    assert entry[1]["d"] == shown.decision_id and entry[1]["r"] == "1.0"


def _stream_entry(vector_field, reward="1.0") -> dict:
    return {"d": "decision", "o": "a", "r": reward, "x": vector_field, "t": repr(time.time())}


@pytest.mark.parametrize("odd", ["json", "unreadable", "nan"])
def test_a_read_with_an_odd_entry_learns_every_readable_one(store, models, caplog, odd):
    """A read is learned in one pass when every entry is packed alike; one written as JSON
    (by a server from before the packed form) is learned too, and one the learner cannot
    read is logged by id and acknowledged with the rest, never retried forever."""
    vectors = [
        SERVED.featurize(
            RequestContext(channel="web", placement="home", hour=9, numeric=(("n", float(k)),)),
            Offer(f"o{k}", "title", topics=(f"t{k % 3}",), channels=("web",), priority=0.5),
            UserEvidence(liked=k % 2 == 0, inferred=0.0, contacts_today=0),
        )
        for k in range(6)
    ]
    for vector in vectors:
        store.client.xadd(keys.OUTCOME_STREAM, _stream_entry(pack(vector.to_json())))
    field, reward, learned = {
        "json": (json.dumps(vectors[0].to_json()), "1.0", 7),
        "unreadable": ("ff" * 24, "1.0", 6),
        "nan": (pack(vectors[0].to_json()), "nan", 6),
    }[odd]
    odd_id = store.client.xadd(keys.OUTCOME_STREAM, _stream_entry(field, reward))
    learner = new_learner(models)
    learner.start()
    learner.step(block_ms=0)
    assert learner.regression.updates == learned
    if learned == 6:
        assert f"reward {odd_id} skipped: unreadable" in caplog.text
    learner.step(block_ms=0)  # saves, and acknowledges all seven
    assert store.client.xpending(keys.OUTCOME_STREAM, keys.LEARNER_GROUP)["pending"] == 0
    learner.stop()


def _stream_fields(store, decisions):
    import json

    for response in decisions:
        record = json.loads(store.client.get(keys.DecisionKeys.of(response.decision_id).record))
        yield {"x": json.dumps(record["features"]["a"])}


@pytest.mark.both_stores
def test_a_bad_snapshot_is_rejected_and_the_previous_model_kept(
    store, catalog, decisioning, models
):
    catalog.PutOffer(catalog_pb2.PutOfferRequest(offer=offer("a", priority=0.5)))
    good = models.publish(
        lambda v: LinearModel(f"ridge-{v}", prior_theta(SERVED.dim), SERVED.layout).to_bytes(),
        keep=5,
        now=time.time(),
    )
    assert decide_with_model(decisioning, f"ridge-{good}").model_version == f"ridge-{good}"
    rejected = metrics.MODEL_REJECTED._value.get()
    for count, payload in enumerate(
        (
            b"not a snapshot",
            LinearModel("ridge-x", np.zeros(7), SERVED.layout).to_bytes(),  # wrong size
            LinearModel("ridge-y", prior_theta(SERVED.dim), "other-layout/9").to_bytes(),
            *bad_variance_snapshots()[:1],  # a variance of the wrong size
        ),
        start=1,
    ):
        models.publish(lambda v, p=payload: p, keep=5, now=time.time())
        decisioning.Decide(d.DecideRequest(user_id="u", channel="web"))  # sees it: a load
        assert until(metrics.MODEL_REJECTED._value.get, lambda n, c=count: n == rejected + c)
        response = decisioning.Decide(d.DecideRequest(user_id="u", channel="web"))
        assert response.model_version == f"ridge-{good}"
    assert metrics.MODEL_REJECTED._value.get() == rejected + 4


class VersionedModels:
    """Just the part of a Store the model cache reads: one snapshot per version."""

    def __init__(self) -> None:
        self.loaded: list[int] = []

    def load_model(self, *, version: int) -> bytes:
        self.loaded.append(version)
        return LinearModel(f"ridge-{version}", prior_theta(SPACE.dim), SPACE.layout).to_bytes()


def served(cache: ModelCache, version: int) -> str:
    """The model ``cache`` serves once fresh reads of ``version`` have had it loaded."""
    return until(
        lambda: cache.model(version, read_at=time.monotonic()).version,
        lambda served: served == f"ridge-{version}",
    )


def test_a_request_that_read_before_a_rollback_does_not_switch_the_model_back():
    store = VersionedModels()
    cache = ModelCache(store, SPACE, kappa=1.0)
    assert served(cache, 3) == "ridge-3"
    in_flight = time.monotonic()  # a request read version 3 here, then a rollback to 2...
    assert served(cache, 2) == "ridge-2"
    assert cache.model(3, read_at=in_flight).version == "ridge-2"  # ...it keeps the rollback
    stays = until(
        lambda: (cache.model(2, read_at=in_flight).version, list(store.loaded)),
        lambda now: now != ("ridge-2", [3, 2]),
        timeout=0.3,
    )
    assert stays == ("ridge-2", [3, 2])  # and asks for no load of 3
    assert served(cache, 4) == "ridge-4"  # a new one is used
    assert store.loaded == [3, 2, 4]


@pytest.mark.both_stores
def test_rollback_pins_an_earlier_version(store, catalog, decisioning, models):
    catalog.PutOffer(catalog_pb2.PutOfferRequest(offer=offer("a", priority=0.5)))

    def snapshot(v: int) -> bytes:
        return LinearModel(f"ridge-{v}", prior_theta(SERVED.dim), SERVED.layout).to_bytes()

    v1 = models.publish(snapshot, keep=2, now=1.0)
    v2 = models.publish(snapshot, keep=2, now=2.0)
    v3 = models.publish(snapshot, keep=2, now=3.0)
    current, versions = models.versions()
    assert current == v3 and [v for v, _ in versions] == [v2, v3]  # keeps the last 2
    with pytest.raises(KeyError):
        models.rollback(v1)
    assert decide_with_model(decisioning, f"ridge-{v3}").model_version == f"ridge-{v3}"
    models.rollback(v2)  # a lower version than the one served: it is loaded all the same
    assert decide_with_model(decisioning, f"ridge-{v2}").model_version == f"ridge-{v2}"
    assert models.publish(snapshot, keep=2, now=4.0) is None  # pinned: nothing new served
    models.unpin()
    assert models.publish(snapshot, keep=2, now=5.0) is not None


def test_exploration_narrows_as_the_model_learns():
    theta = prior_theta(SPACE.dim)
    fresh = LinearModel("prior", theta, SPACE.layout)
    seasoned = LinearModel.from_bytes(
        LinearModel("ridge-9", theta, SPACE.layout, updates=10_000).to_bytes(), SPACE
    )
    assert seasoned.updates == 10_000
    assert fresh.gamma(200, 20) == 200  # the floor
    assert seasoned.gamma(200, 20) == pytest.approx(2000)
    predicted = np.array([0.3, 0.2, 0.1])
    assert (
        igw_probabilities(predicted, seasoned.gamma(200, 20))[0]
        > igw_probabilities(predicted, fresh.gamma(200, 20))[0]
    )


@pytest.mark.both_stores
def test_due_reward_windows_are_closed_in_batches(catalog, decisioning, models):
    catalog.PutOffer(catalog_pb2.PutOfferRequest(offer=offer("a", priority=0.5)))
    for i in range(5):
        decisioning.Decide(d.DecideRequest(user_id=f"u{i}", channel="web"))
    later = time.time() + 3600
    assert models.close_due_windows(later, batch=2) == 5  # three batches in one call
    assert models.close_due_windows(later, batch=2) == 0  # each offer learned once


@pytest.mark.both_stores
def test_a_rollback_racing_the_learners_publishing_always_wins(models):
    """The learner publishes every 50 ms; an operator's rollback can land while a publish is
    in flight. Whatever the interleaving, once `rollback` returns the rolled-back version is
    served, kept and pinned."""
    import threading

    snapshot = lambda v: LinearModel(f"ridge-{v}", prior_theta(SPACE.dim), SPACE.layout).to_bytes()  # noqa: E731
    keep = 10_000  # the target stays kept: this is about who sets "current" last
    for trial in range(20):
        models.unpin()
        target = models.publish(snapshot, keep=keep, now=float(trial))
        stop = threading.Event()

        def publish_until_stopped(stop: threading.Event = stop) -> None:
            while not stop.is_set():
                models.publish(snapshot, keep=keep, now=0.0)

        publisher = threading.Thread(target=publish_until_stopped)
        publisher.start()
        time.sleep(0.003)
        models.rollback(target)
        stop.set()
        publisher.join()
        current, versions = models.versions()
        assert current == target, trial
        assert target in [v for v, _ in versions]


@pytest.mark.parametrize("how", ["deleted", "expired"])
def test_an_offer_gone_from_the_catalog_leaves_the_model(catalog, decisioning, models, how):
    """Churn: once an offer is deleted or past its end, its own features (bias, bias per
    channel) go back to never seen, in the state and in what is published; what its topic
    learned stays, for the offers that share it."""
    ends = {"end_time": Timestamp(seconds=int(time.time()) + 3600)} if how == "expired" else {}
    catalog.PutOffer(catalog_pb2.PutOfferRequest(offer=offer("a", ("misc",), **ends)))
    catalog.PutOffer(catalog_pb2.PutOfferRequest(offer=offer("b", ("misc",), priority=0.1)))
    learner = new_learner(models)
    learner.start()
    for i in range(8):
        response = decisioning.Decide(d.DecideRequest(user_id=f"u{i}", channel="web"))
        (choice,) = response.choices
        report(decisioning, response.decision_id, choice.offer_id, d.OUTCOME_EVENT_CLICK, f"o{i}")
    learner.step(block_ms=0)
    own = SERVED.offer_own_indices("a", ("web", "app", "email"), ())
    topic = SERVED.index("t:misc")
    learned_topic = learner.regression.weights[topic]
    assert learner.regression.weights[own].any() and learned_topic != 0
    if how == "deleted":
        catalog.DeleteOffer(catalog_pb2.DeleteOfferRequest(offer_id="a"))
    else:
        learner.clock = lambda: time.time() + 7200  # an hour past its end
    learner._last_sweep = 0.0  # the next step sweeps
    learner.step(block_ms=0)
    assert not learner.regression.weights[own].any()
    assert np.all(learner.regression.variance()[own] == 1.0 / learner.settings.l2)
    assert learner.regression.weights[topic] == learned_topic
    assert "a" not in learner.regression.offers and "b" in learner.regression.offers
    snapshot = undecoded(models.client, "GET", keys.model_snapshot(learner.published_version))
    published = LinearModel.from_bytes(bytes(snapshot), SERVED)
    assert not published.theta[own].any()


def _click_through(catalog, decisioning, n: int, prefix: str) -> None:
    for i in range(n):
        response = decisioning.Decide(d.DecideRequest(user_id=f"{prefix}{i}", channel="web"))
        (choice,) = response.choices
        report(
            decisioning,
            response.decision_id,
            choice.offer_id,
            d.OUTCOME_EVENT_CLICK,
            f"{prefix}{i}",
        )


def test_two_learners_share_the_stream_and_publish_one_model(store, catalog, decisioning, models):
    """A learner that does not hold the lease hands its share to the one that does: every
    reward counts once in the saved state, whichever learner read it."""
    catalog.PutOffer(catalog_pb2.PutOfferRequest(offer=offer("a", ("misc",))))
    holder = new_learner(models)
    other = new_learner(models, publish_interval_ms=0)
    other.consumer, other.leader = "other-host", False
    holder.start()
    other.start()
    _click_through(catalog, decisioning, 10, "first")
    other.step(block_ms=0)  # reads all 10, hands them on as a delta
    assert other.regression.updates == 10
    assert store.client.llen(keys.LEARNER_DELTAS) == 1
    _click_through(catalog, decisioning, 5, "second")
    holder.step(block_ms=0)  # reads 5, merges the delta, publishes, saves
    assert holder.regression.updates == 15
    assert store.client.llen(keys.LEARNER_DELTAS) == 0
    assert store.client.xpending(keys.OUTCOME_STREAM, keys.LEARNER_GROUP)["pending"] == 0
    other.step(block_ms=0)  # stands on the saved state
    assert other.regression.updates == 15
    assert np.array_equal(other.regression.weights, holder.regression.weights)
    # A restarted lease holder finds the same state.
    again = new_learner(models)
    again.start()
    assert again.regression.updates == 15
    assert np.array_equal(again.regression.weights, holder.regression.weights)


def test_a_learner_whose_rewards_were_claimed_does_not_count_them_twice(
    store, catalog, decisioning, models
):
    """A learner that stalled past the claim time: the lease holder took its entries over
    and learned them; its own push is refused, and it reloads."""
    catalog.PutOffer(catalog_pb2.PutOfferRequest(offer=offer("a", ("misc",))))
    stalled = new_learner(models, publish_interval_ms=3_600_000)  # would hand on in an hour
    stalled.consumer, stalled.leader = "stalled-host", False
    stalled.start()
    _click_through(catalog, decisioning, 6, "u")
    stalled.step(block_ms=0)  # reads all 6, keeps them
    assert stalled.regression.updates == 6
    holder = new_learner(models)
    holder.claim_idle_ms = 0  # (the 10 s of idleness, skipped)
    holder.start()  # claims the stalled learner's 6 and learns them
    holder.step(block_ms=0)
    assert holder.regression.updates == 6
    stalled.hand_on(force=True)  # refused: they are no longer its own
    assert store.client.llen(keys.LEARNER_DELTAS) == 0
    assert stalled.regression.updates == 6  # reloaded: the saved state's 6, nothing added
    holder.step(block_ms=0)
    assert holder.regression.updates == 6
