"""Eligibility on the catalog's arrays (``OfferTable.eligible``) against its reference,
``hard_rules.eligible(candidates(...))``: the same offers in the same order for every
catalog, request, user and segment membership: offers timed, sensitive, targeted, on other
channels; candidates named twice or unknown; stances, opt-outs and cooldowns of every kind.
The user's evidence on those offers against ``features.evidence_reference``, and the one-match
check of the candidate ids against the per-id pattern."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tactful.domain import DecideRequest, Offer, Segment
from tactful.features import evidence_reference
from tactful.hard_rules import NOTHING_KNOWN, HardRules, candidates, eligible
from tactful.offer_table import OfferTable
from tactful.segment_book import SegmentBook
from tactful.validation import OFFER_ID_RE, _all_offer_ids

NOW = 1_000_000.0
TOPICS = st.sampled_from(["sports", "travel", "food", "news", "health", "été"])
CHANNELS = st.sampled_from(["web", "app", "email"])
SEGMENTS = st.sampled_from(["vip", "new", "gone"])  # "gone" is not in the book
WHEN = st.one_of(st.none(), st.sampled_from([NOW - 10.0, NOW, NOW + 10.0]))
OFFERS = st.lists(
    st.builds(
        lambda i, topics, channels, sensitive, start, end, cap, segments, excluded: Offer(
            f"o{i}", "", tuple(topics), tuple(channels), 0.5, sensitive, start, end, cap,
            tuple(segments), tuple(excluded),
        ),
        st.integers(0, 40),
        st.lists(TOPICS, max_size=3, unique=True),
        st.lists(CHANNELS, max_size=3, unique=True),
        st.booleans(),
        WHEN,
        WHEN,
        st.sampled_from([0, 0, 2]),
        st.lists(SEGMENTS, max_size=2, unique=True),
        st.lists(SEGMENTS, max_size=1),
    ),
    max_size=40,
    unique_by=lambda o: o.offer_id,
)  # fmt: skip
TOPIC_SETS = st.frozensets(TOPICS, max_size=3)
COOLING = st.frozensets(
    st.one_of(st.builds(lambda i: f"o:o{i}", st.integers(0, 40)), TOPICS.map(lambda t: f"t:{t}")),
    max_size=4,
)
BOOK = SegmentBook([Segment("vip", 'attr.tier == "gold"'), Segment("new", 'attr.age == "new"')])


@settings(max_examples=400, deadline=None)
@given(
    OFFERS,
    st.lists(st.builds(lambda i: f"o{i}", st.integers(0, 45)), max_size=30),
    CHANNELS,
    TOPIC_SETS,
    TOPIC_SETS,
    COOLING,
    st.frozensets(SEGMENTS, max_size=3),
)
def test_the_table_keeps_exactly_what_the_hard_rules_keep(
    offers, candidate_ids, channel, liked, disliked, cooling, members
):
    catalog = {o.offer_id: o for o in offers}
    rules = HardRules(liked, disliked, frozenset(), cooling)
    req = DecideRequest(user_id="u", channel=channel, candidate_offer_ids=tuple(candidate_ids))
    expected = eligible(candidates(req, catalog), channel, NOW, rules, BOOK, members)
    got = OfferTable(catalog).eligible(candidate_ids, channel, NOW, rules, BOOK, members)
    assert [o.offer_id for o in got] == [o.offer_id for o in expected]


def test_every_offer_in_catalog_order_when_no_candidates_are_named():
    offers = {f"o{i}": Offer(f"o{i}", "", ("news",), ("web",)) for i in (3, 1, 2)}
    got = OfferTable(offers).eligible((), "web", NOW, NOTHING_KNOWN, BOOK, frozenset())
    assert [o.offer_id for o in got] == ["o3", "o1", "o2"]


def test_an_empty_catalog_keeps_nothing():
    table = OfferTable({})
    assert table.eligible(("o1",), "web", NOW, NOTHING_KNOWN, BOOK, frozenset()) == []


@settings(max_examples=500, deadline=None)
@given(
    st.lists(
        st.text(st.sampled_from("aZ9._:-\n é"), max_size=4)
        | st.sampled_from(["a" * 128, "a" * 129, "\n", ""]),
        max_size=6,
    )
)
def test_candidate_ids_are_checked_at_once_as_one_by_one(ids):
    """Decide's candidates are validated in one match (validation._all_offer_ids): it
    accepts exactly the lists whose every id matches OFFER_ID_RE."""
    assert _all_offer_ids(ids) == all(OFFER_ID_RE.fullmatch(i) for i in ids)


@settings(max_examples=300, deadline=None)
@given(
    OFFERS,
    st.data(),
    TOPIC_SETS,
    st.dictionaries(
        st.sampled_from(["sports", "travel", "health", "none-offered"]),
        st.one_of(st.floats(-1.0, 50.0), st.integers(0, 4)),
    ),
)
def test_the_table_finds_the_reference_evidence(offers, data, liked, inferred):
    """The user's evidence on the eligible offers, from their topic numbers, is
    ``features.evidence_reference`` on those offers exactly (explicit like, and the
    strongest inferred strength squashed), whatever the positions and their order."""
    table = OfferTable({o.offer_id: o for o in offers})
    order = data.draw(st.permutations(range(table.size)))
    at = np.array(order[: data.draw(st.integers(0, table.size))], dtype=np.intp)
    expected = evidence_reference(table.offers_at(at), liked, inferred)
    assert table.evidence(at, liked, inferred) == expected
