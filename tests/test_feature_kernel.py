"""The compiled per-offer loops of a Decide's features (``tactful._features``) against their
pure-Python references (``features.offer_rows_reference``, ``features.evidence_reference``):
the same rows, indices and values bit for bit, for every feature set, context, user evidence
and segment membership, and the same evidence for every profile."""

from __future__ import annotations

import shutil
import sysconfig

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tactful import features
from tactful.domain import Offer
from tactful.features import FEATURE_SETS, FeatureSpace, RequestContext

COMPILER = shutil.which((sysconfig.get_config_var("CC") or "cc").split()[0])
pytestmark = pytest.mark.skipif(
    not features.COMPILED and COMPILER is None,
    reason="no C compiler: the feature loops run their pure-Python references",
)

TOPICS = st.sampled_from(["sports", "travel", "food", "news", "games", "été"])
PRIORITY = st.one_of(st.floats(-2.0, 2.0, allow_nan=False), st.integers(0, 3))
OFFERS = st.lists(
    st.builds(
        lambda i, topics, priority: Offer(f"o{i}", "", tuple(topics), ("web",), priority),
        st.integers(0, 30),
        st.lists(TOPICS, min_size=1, max_size=3, unique=True),
        PRIORITY,
    ),
    max_size=40,
)
CONTEXTS = st.builds(
    RequestContext,
    st.sampled_from(["web", "app"]),
    st.sampled_from(["", "home"]),
    st.integers(0, 23),
    st.lists(st.tuples(st.sampled_from(["device", "country"]), st.sampled_from(["a", "b"])),
             max_size=2, unique_by=lambda kv: kv[0]).map(tuple),
    st.lists(st.tuples(st.sampled_from(["cart", "age"]), st.floats(-1e6, 1e6)),
             max_size=2, unique_by=lambda kv: kv[0]).map(tuple),
)  # fmt: skip
STRENGTHS = st.dictionaries(TOPICS, st.one_of(st.floats(-1.0, 50.0), st.integers(0, 4)))


def test_the_kernel_is_built():
    assert features.COMPILED, "a C compiler is here, but tactful._features was not built"


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(FEATURE_SETS),
    CONTEXTS,
    OFFERS,
    st.data(),
    st.integers(0, 5),
    st.lists(st.sampled_from(["s1", "s2", "s3"]), max_size=3, unique=True),
)
def test_the_kernel_builds_the_reference_rows(
    feature_set, ctx, offers, data, contacts_today, segments
):
    liked = data.draw(st.lists(st.booleans(), min_size=len(offers), max_size=len(offers)))
    inferred = data.draw(st.lists(st.floats(0.0, 0.99), min_size=len(offers), max_size=len(offers)))
    compiled = FeatureSpace(12, feature_set).featurize_many(
        ctx, offers, liked, inferred, contacts_today, segments
    )
    compiled_rows = features.offer_rows
    features.offer_rows = features.offer_rows_reference
    try:
        reference = FeatureSpace(12, feature_set).featurize_many(
            ctx, offers, liked, inferred, contacts_today, segments
        )
    finally:
        features.offer_rows = compiled_rows
    assert compiled_rows is not features.offer_rows_reference
    assert len(compiled) == len(reference) == len(offers)
    for i in range(len(offers)):
        assert compiled.vector(i) == reference.vector(i)  # indices, values (==), blocks
    theta = np.linspace(-1.0, 1.0, FeatureSpace(12).dim)
    assert compiled.dot(theta).tolist() == reference.dot(theta).tolist()


@settings(max_examples=300, deadline=None)
@given(OFFERS, st.frozensets(TOPICS), STRENGTHS)
def test_the_kernel_finds_the_reference_evidence(offers, liked_topics, inferred):
    compiled = features.evidence(offers, liked_topics, inferred)
    reference = features.evidence_reference(offers, liked_topics, inferred)
    assert compiled == reference
    assert features.evidence(tuple(offers), liked_topics, dict(inferred)) == reference


def test_rows_of_mismatched_lengths_are_refused():
    offer = Offer("o", "", ("sports",), ("web",))
    for rows in (features.offer_rows, features.offer_rows_reference):
        with pytest.raises(ValueError):
            rows(
                [offer], [True, False], [0.0], 0, 0.0, {}, None, {}, None, features.array("q"), None
            )


@pytest.mark.parametrize("feature_set", FEATURE_SETS)
def test_an_offer_whose_topics_changed_gets_the_new_topics_indices(feature_set):
    """The rows are cached by offer id in each context: a new catalog version that changes an
    offer's topics must not be featurized with the old ones."""
    ctx = RequestContext("web", "home", 10)
    before = Offer("o1", "", ("sports",), ("web",))
    after = Offer("o1", "", ("travel", "food"), ("web",))
    space = FeatureSpace(12, feature_set)
    space.featurize_many(ctx, [before], [False], [0.0], 0)
    again = space.featurize_many(ctx, [after], [False], [0.0], 0).vector(0)
    fresh = FeatureSpace(12, feature_set).featurize_many(ctx, [after], [False], [0.0], 0)
    assert again == fresh.vector(0)
    if feature_set != "offer":  # there the offer's id alone is its unit
        assert again != FeatureSpace(12, feature_set).featurize(
            ctx, before, features.UserEvidence(False, 0.0, 0)
        )
