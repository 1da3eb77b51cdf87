"""ReportOutcome: joined to the logged decision, idempotent, NOT_FOUND for unknown ones,
on a real redis-server and on a Redis Cluster."""

from __future__ import annotations

import json

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tactful import keys, metrics
from tactful.store.codecs import record_json as _record_json
from tactful.v1 import catalog_pb2
from tactful.v1 import decisioning_pb2 as d

from conftest import offer

pytestmark = pytest.mark.both_stores


@pytest.fixture
def decision(catalog, decisioning) -> d.DecideResponse:
    for o in (offer("a", priority=0.9), offer("b", priority=0.5)):
        catalog.PutOffer(catalog_pb2.PutOfferRequest(offer=o))
    return decisioning.Decide(d.DecideRequest(user_id="alice", channel="web", slots=2))


def report(decisioning, decision_id, offer_id, event, outcome_id, **kw):
    request = d.ReportOutcomeRequest(
        decision_id=decision_id, offer_id=offer_id, event=event, outcome_id=outcome_id, **kw
    )
    return decisioning.ReportOutcome(request)


def stored(store, decision_id) -> dict:
    raw = store.client.hgetall(keys.DecisionKeys.of(decision_id).outcomes)
    return {k: json.loads(v) for k, v in raw.items()}


def test_outcomes_are_stored_with_their_rewards(store, decisioning, decision):
    did = decision.decision_id
    assert report(decisioning, did, "a", d.OUTCOME_EVENT_CLICK, "o1").recorded
    assert report(decisioning, did, "a", d.OUTCOME_EVENT_CONVERSION, "o2", value=12.5).recorded
    assert report(decisioning, did, "b", d.OUTCOME_EVENT_DISMISS, "o3").recorded
    assert report(decisioning, did, "b", d.OUTCOME_EVENT_IMPRESSION_IGNORED, "o4").recorded
    outcomes = stored(store, did)
    rewards = {k: (v["offer_id"], v["event"], v["reward"]) for k, v in outcomes.items()}
    assert rewards == {
        "o1": ("a", "CLICK", 1.0),
        "o2": ("a", "CONVERSION", 12.5),
        "o3": ("b", "DISMISS", 0.0),
        "o4": ("b", "IMPRESSION_IGNORED", 0.0),
    }
    # Outcomes live as long as their decision.
    assert store.client.ttl(keys.DecisionKeys.of(did).outcomes) > 0


def test_a_duplicate_outcome_id_counts_once(store, decisioning, decision):
    did = decision.decision_id
    assert report(decisioning, did, "a", d.OUTCOME_EVENT_CLICK, "same").recorded is True
    again = report(decisioning, did, "a", d.OUTCOME_EVENT_CONVERSION, "same", value=99)
    assert again.recorded is False
    assert stored(store, did)["same"]["event"] == "CLICK"


def test_unknown_or_expired_decision_is_not_found(store, decisioning, decision):
    counter = metrics.OUTCOMES.labels("CLICK", "unknown_decision")
    before = counter._value.get()
    with pytest.raises(grpc.RpcError) as err:
        report(decisioning, "f" * 32, "a", d.OUTCOME_EVENT_CLICK, "o1")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    store.client.delete(keys.DecisionKeys.of(decision.decision_id).record)  # as a TTL would
    with pytest.raises(grpc.RpcError) as err:
        report(decisioning, decision.decision_id, "a", d.OUTCOME_EVENT_CLICK, "o1")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert counter._value.get() == before + 2


def test_dry_run_decisions_take_no_outcomes(catalog, decisioning):
    catalog.PutOffer(catalog_pb2.PutOfferRequest(offer=offer("a")))
    dry = decisioning.Decide(d.DecideRequest(user_id="alice", channel="web", dry_run=True))
    with pytest.raises(grpc.RpcError) as err:
        report(decisioning, dry.decision_id, "a", d.OUTCOME_EVENT_CLICK, "o1")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


numbers = st.one_of(
    # Every number a record holds is finite (validation refuses the rest) and fits 64 bits.
    st.floats(allow_nan=False, allow_infinity=False),  # -0.0, subnormals, huge values
    st.sampled_from([0.0, -0.0, 1.0, 1, 0, 0.5773502691896258]),
    st.integers(-(2**63), 2**63 - 1),
)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=12),
        st.tuples(st.lists(st.integers(0, 600), max_size=8), st.lists(numbers, max_size=12)),
        max_size=4,
    ),
    st.booleans(),
)
def test_the_decision_record_reads_back_as_it_was_written(features, features_last):
    """The log record's fast encoder (orjson) gives any JSON reader exactly the values
    json.dumps would: ints stay ints, floats come back bit for bit, -0.0 stays -0.0."""
    payload = {"decision_id": "d1", "choices": [{"score": 1.5, "propensity": 0.25}]}
    payload["features"] = {k: [list(i), list(v)] for k, (i, v) in features.items()}
    if not features_last:
        payload["ts"] = 1.5
    read = json.loads(_record_json(payload))
    assert read == json.loads(json.dumps(payload))
    assert repr(read) == repr(payload)  # 1 and 1.0, 0.0 and -0.0 are not mixed up


@pytest.mark.parametrize("value", [1.5e308, -1e4, float("inf")])
def test_an_absurd_reward_value_is_refused(decisioning, decision, value):
    with pytest.raises(grpc.RpcError) as err:
        report(decisioning, decision.decision_id, "a", d.OUTCOME_EVENT_CONVERSION, "v", value=value)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
